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

template <typename T>
__device__ __forceinline__ T fast_exp(T x);
template <>
__device__ __forceinline__ float fast_exp<float>(float x) {
  return __expf(x);
}
template <>
__device__ __forceinline__ double fast_exp<double>(double x) {
  return ::exp(x);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace cuda
}  // namespace maskattn
