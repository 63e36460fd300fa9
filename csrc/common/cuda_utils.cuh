#pragma once
// Small CUDA helpers shared by the kernels: vectorised loads and block reductions.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>

namespace maskattn {
namespace cuda {

// VEC consecutive elements moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    // NaN wins (and then stays): a row whose valid logits are all NaN (or NaN and -inf) must come
    // out NaN, not look "empty" (max = -inf) and give zeros.
    v = (u > v || u != u) ? u : v;
  }
  return v;
}

// Reduction over a whole block (blockDim.x * blockDim.y threads, a multiple of 32). `scratch` holds
// at least 32 values. Every thread gets the result.
template <typename T, bool IS_MAX>
__device__ __forceinline__ T block_reduce(T v, T* scratch) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int lane = tid & 31, warp = tid >> 5, nwarps = (nthreads + 31) >> 5;
  v = IS_MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const T ident = IS_MAX ? -std::numeric_limits<T>::infinity() : T(0);
  v = lane < nwarps ? scratch[lane] : ident;
  return IS_MAX ? warp_max(v) : warp_sum(v);
}

// e^x with the library exp (expf: within 2 ulp over the whole range, subnormal results kept),
// not __expf: the intrinsic flushes subnormal results to 0 (it is ex2.approx.ftz) and its error
// grows with |x| (2 + 1.16 |x| ulp, ~25 ulp at x = -20). The kernels are memory-bound; expf is a
// handful of FMAs around the same ex2 instruction.
__device__ __forceinline__ float dev_exp(float x) {
  return ::expf(x);
}
__device__ __forceinline__ double dev_exp(double x) {
  return ::exp(x);
}

// e^(v - m) for v <= m (a softmax numerator), with the rounding error of v - m recovered exactly
// (Knuth's TwoSum: additions only, which nvcc never contracts or reorders) and applied to the
// result, as the CPU kernels do: a logit 20 below the max would otherwise carry up to 1e-6 of
// relative error (float32) into its weight before the exp is even taken. e^-inf is exactly 0 and
// NaN stays NaN.
template <typename T>
__device__ __forceinline__ T exp_diff(T v, T m) {
  const T d = v - m;
  const T e = dev_exp(d);
  const T vv = d + m;
  const T lo = (v - vv) - (m + (d - vv));
  return e == T(0) ? e : e + e * lo;
}

// Running sum of a long per-thread stream (a thread's share of a 10^6-row bag): `inner` takes
// kFold values, then is added to `outer`. The rounding error grows with kFold + n / kFold instead
// of n; the block-level tree reductions that follow are pairwise already.
constexpr int kFold = 16;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// A packed-bag offset clamped into [0, T] (T rows in all). The kernels read offsets on the device,
// unchecked (a host check would need a sync): whatever they hold, every row index stays in bounds.
__host__ __device__ __forceinline__ int64_t clamp_offset(int64_t o, int64_t T) {
  return o < 0 ? int64_t(0) : (o > T ? T : o);
}

// Rows [r0, r1) of packed bag b: offsets[b] and offsets[b + 1] clamped into [0, T], with r1 >= r0
// (decreasing offsets give an empty bag).
__device__ __forceinline__ void packed_bag_range(const int64_t* offsets, int64_t b, int64_t T, int64_t& r0,
                                                 int64_t& r1) {
  r0 = clamp_offset(offsets[b], T);
  const int64_t hi = clamp_offset(offsets[b + 1], T);
  r1 = hi < r0 ? r0 : hi;
}

}  // namespace cuda
}  // namespace maskattn
