// CUDA row kernels of scaled_cross_attention: one warp per query row.
//
// Few keys (Lk <= 64, the few-shot case): the warp reads its query row once per tile of eight
// keys (the row stays in L1), reduces the dot products with shuffles, does the softmax with one
// or two keys per lane, and writes the output row; the keys and values (a few KiB) are shared by
// all warps through L1/L2. The scale is read from device memory inside the kernel, so nothing
// waits for the host. The backward kernel recomputes the row's logits the same way and writes
// grad_query in the same visit; the reductions over rows (grad_key, grad_value) are cuBLAS GEMMs
// in the shared driver.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <limits>

#include "common/cuda_utils.cuh"
#include "scaled_cross_attention.h"

namespace maskattn {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxFusedKeys = 2 * kWarp;  // the softmax holds at most two keys per lane
constexpr int kKeyTile = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T x = __shfl_xor_sync(0xffffffffu, v, o);
    v = (x > v || x != x) ? x : v;  // NaN wins: an all-NaN row is NaN, not "no valid key"
  }
  return v;
}

// Index of the largest v across the warp (lowest index on ties); the lanes' own j (INT_MAX /
// INT64_MAX) when no lane has one. I is int64_t where key indices may pass 2^31 (the GEMM path).
template <typename T, typename I>
__device__ __forceinline__ I warp_argmax(T v, I j) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const I oj = __shfl_xor_sync(0xffffffffu, j, o);
    if (ov > v || (ov == v && oj < j)) {
      v = ov;
      j = oj;
    }
  }
  return j;
}

template <typename T>
__device__ __forceinline__ T ninf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T inv_norm(T n) {
  const T eps = static_cast<T>(kXattnNormEps);
  return T(1) / (n > eps ? n : eps);
}

// e^(v - m) with the subtraction's rounding error recovered, as every softmax here computes it
// (common/cuda_utils.cuh; the CPU kernels do the same).
template <typename T>
__device__ __forceinline__ T dev_exp_diff(T v, T m) {
  return cuda::exp_diff<T>(v, m);
}
__device__ __forceinline__ float dev_sqrt(float x) {
  return ::sqrtf(x);
}
__device__ __forceinline__ double dev_sqrt(double x) {
  return ::sqrt(x);
}

enum ScaleCode : int { kScaleF32 = 0, kScaleF64 = 1, kScaleF16 = 2, kScaleBF16 = 3 };

int scale_code(const at::Tensor& lsl) {
  switch (lsl.scalar_type()) {
    case at::kFloat:
      return kScaleF32;
    case at::kDouble:
      return kScaleF64;
    case at::kHalf:
      return kScaleF16;
    case at::kBFloat16:
      return kScaleBF16;
    default:
      TORCH_CHECK(false, "scaled_cross_attention: logit_scale_log has unsupported dtype ", lsl.scalar_type());
  }
  return kScaleF32;
}

// min(exp(lsl), max_scale) with exp rounded to lsl's dtype, as the eager composition computes it.
// Every thread reads the one value itself: no launch, no host sync. exp in double then rounded
// gives the correctly rounded result.
__device__ __forceinline__ double load_scale(const void* p, int code, double max_scale) {
  double s, m = max_scale;
  switch (code) {
    case kScaleF64:
      s = ::exp(*static_cast<const double*>(p));
      break;
    case kScaleF16:
      s = static_cast<float>(c10::Half(static_cast<float>(
          ::exp(static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(p)))))));
      m = static_cast<float>(max_scale);
      break;
    case kScaleBF16:
      s = static_cast<float>(c10::BFloat16(static_cast<float>(
          ::exp(static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(p)))))));
      m = static_cast<float>(max_scale);
      break;
    default:
      s = static_cast<float>(::exp(static_cast<double>(*static_cast<const float*>(p))));
      m = static_cast<float>(max_scale);
      break;
  }
  return s > m ? m : s;  // NaN stays NaN, as with torch.clamp
}

// Row r's query dot products with keys j in [0, Lk) into w[j] (shared), and |q|^2 if wanted.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_dots(const scalar_t* __restrict__ x, const scalar_t* __restrict__ rows,
                                          int Lk, int64_t D, acc_t* w, bool want_sq, int lane) {
  acc_t s2 = 0;
  if (want_sq) {
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t xv = static_cast<acc_t>(x[d]);
      s2 += xv * xv;
    }
    s2 = warp_sum(s2);
  }
  for (int j0 = 0; j0 < Lk; j0 += kKeyTile) {
    acc_t part[kKeyTile];
#pragma unroll
    for (int t = 0; t < kKeyTile; ++t) part[t] = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t xv = static_cast<acc_t>(x[d]);
#pragma unroll
      for (int t = 0; t < kKeyTile; ++t) {
        if (j0 + t < Lk) part[t] += xv * static_cast<acc_t>(rows[(j0 + t) * D + d]);
      }
    }
#pragma unroll
    for (int t = 0; t < kKeyTile; ++t) {
      const acc_t s = warp_sum(part[t]);
      if (lane == 0 && j0 + t < Lk) w[j0 + t] = s;
    }
  }
  __syncwarp();
  return s2;
}

int64_t num_blocks(int64_t rows) {
  // Grid-stride loops cover the rest; this cap keeps gridDim.x well inside its limit.
  return std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t(1) << 20);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const scalar_t* __restrict__ x, int64_t s0, int64_t s1, int64_t N, int64_t M, int64_t D,
                     acc_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp; r < N * M;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const scalar_t* row = x + (r / M) * s0 + (r % M) * s1;
    acc_t s2 = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t v = static_cast<acc_t>(row[d]);
      s2 += v * v;
    }
    s2 = warp_sum(s2);
    if (lane == 0) out[r] = dev_sqrt(s2);
  }
}

// Batch strides of keys/values/mask/key norms: 0 when shared by the whole batch.
struct Strides {
  int64_t qs0, qs1, kb, vb, mb, nb;
};

Strides make_strides(const XattnArgs& a) {
  Strides s;
  s.qs0 = a.q.stride(0);
  s.qs1 = a.q.stride(1);
  s.kb = a.k.size(0) == 1 ? 0 : a.Lk * a.D;
  s.vb = a.v.size(0) == 1 ? 0 : a.Lk * a.Dv;
  s.mb = a.mask.defined() && a.mask.size(0) != 1 ? a.Lk : 0;
  s.nb = a.k.size(0) == 1 ? 0 : a.Lk;
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    fused_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, const bool* __restrict__ mask,
                         const acc_t* __restrict__ knrm, Strides st, const void* lsl, int lsl_code,
                         double max_scale, int64_t R, int64_t Lq, int Lk, int64_t D, int64_t Dv,
                         scalar_t* __restrict__ out, scalar_t* __restrict__ attn) {
  __shared__ acc_t sw[kWarpsPerBlock][kMaxFusedKeys];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  acc_t* w = sw[warp];
  const acc_t c = static_cast<acc_t>(load_scale(lsl, lsl_code, max_scale));
  const bool normalize = knrm != nullptr;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp; r < R;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = r / Lq, i = r - b * Lq;
    const acc_t s2 =
        row_dots<scalar_t, acc_t>(q + b * st.qs0 + i * st.qs1, k + b * st.kb, Lk, D, w, normalize, lane);
    const acc_t qinv = normalize ? inv_norm(dev_sqrt(s2)) : acc_t(1);
    acc_t l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = lane + h * kWarp;
      l[h] = ninf<acc_t>();
      if (j < Lk && (mask == nullptr || mask[b * st.mb + j])) {
        const acc_t kinv = normalize ? inv_norm(knrm[b * st.nb + j]) : acc_t(1);
        l[h] = c * (w[j] * qinv * kinv);
      }
    }
    const acc_t m = warp_max((l[0] > l[1] || l[0] != l[0]) ? l[0] : l[1]);
    acc_t e[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
      e[h] = (m == ninf<acc_t>() || l[h] == ninf<acc_t>()) ? acc_t(0) : dev_exp_diff(l[h], m);
    const acc_t sum = warp_sum(e[0] + e[1]);
    const acc_t inv = m == ninf<acc_t>() ? acc_t(0) : acc_t(1) / sum;  // no valid key: zeros
    __syncwarp();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = lane + h * kWarp;
      if (j < Lk) {
        // masked keys (-inf) stay exactly 0 even when a NaN / +inf logit makes inv NaN
        const acc_t a = l[h] == ninf<acc_t>() ? acc_t(0) : e[h] * inv;
        w[j] = a;
        attn[r * Lk + j] = static_cast<scalar_t>(a);
      }
    }
    __syncwarp();
    const scalar_t* vr = v + b * st.vb;
    for (int64_t d = lane; d < Dv; d += kWarp) {
      acc_t o = 0;
      for (int j = 0; j < Lk; ++j) {
        const acc_t a = w[j];  // warp-uniform: zero weights (masked keys) skip their value rows
        if (a != acc_t(0)) o += a * static_cast<acc_t>(vr[j * Dv + d]);
      }
      out[r * Dv + d] = static_cast<scalar_t>(o);
    }
    __syncwarp();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    fused_backward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v, const acc_t* __restrict__ knrm, Strides st,
                          const scalar_t* __restrict__ gout, const scalar_t* __restrict__ gattn,
                          const scalar_t* __restrict__ attn, const void* lsl, int lsl_code, double max_scale,
                          int64_t R, int64_t Lq, int Lk, int64_t D, int64_t Dv, scalar_t* __restrict__ dq,
                          acc_t* __restrict__ wqk, acc_t* __restrict__ p) {
  __shared__ acc_t s_cos[kWarpsPerBlock][kMaxFusedKeys];
  __shared__ acc_t s_da[kWarpsPerBlock][kMaxFusedKeys];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  acc_t* wc = s_cos[warp];
  acc_t* wd = s_da[warp];
  const acc_t c = static_cast<acc_t>(load_scale(lsl, lsl_code, max_scale));
  const bool normalize = knrm != nullptr;
  const acc_t eps = static_cast<acc_t>(kXattnNormEps);
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp; r < R;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = r / Lq, i = r - b * Lq;
    const scalar_t* qr = q + b * st.qs0 + i * st.qs1;
    const scalar_t* kr = k + b * st.kb;
    const acc_t s2 = row_dots<scalar_t, acc_t>(qr, kr, Lk, D, wc, normalize, lane);
    row_dots<scalar_t, acc_t>(gout + r * Dv, v + b * st.vb, Lk, Dv, wd, false, lane);
    const acc_t qn = dev_sqrt(s2);
    const acc_t qinv = normalize ? inv_norm(qn) : acc_t(1);
    acc_t a[2], da[2], kinv[2];
    acc_t s = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = lane + h * kWarp;
      a[h] = 0;
      da[h] = 0;
      kinv[h] = 1;
      if (j < Lk) {
        a[h] = static_cast<acc_t>(attn[r * Lk + j]);
        da[h] = wd[j] + (gattn ? static_cast<acc_t>(gattn[r * Lk + j]) : acc_t(0));
        if (normalize) kinv[h] = inv_norm(knrm[b * st.nb + j]);
        if (a[h] != acc_t(0)) s += a[h] * da[h];
      }
    }
    s = warp_sum(s);
    // The softmax gradient sums to zero only in exact arithmetic; as the eager composition's
    // row-max subtraction does, minus its float sum goes to the arg-max key (this keeps the
    // scale's gradient, sum dlogit * cos, accurate in float32).
    acc_t ds[2], best = acc_t(-1);
    int bestj = INT_MAX;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = lane + h * kWarp;
      ds[h] = a[h] != acc_t(0) ? a[h] * (da[h] - s) : acc_t(0);
      if (j < Lk && a[h] != acc_t(0) && a[h] > best) {
        best = a[h];
        bestj = j;
      }
    }
    const acc_t dsum = warp_sum(ds[0] + ds[1]);
    const int jm = warp_argmax(best, bestj);
    acc_t psum = 0;
    __syncwarp();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = lane + h * kWarp;
      if (j < Lk) {
        const acc_t dsj = j == jm ? ds[h] - dsum : ds[h];
        const acc_t pj = dsj * (wc[j] * qinv * kinv[h]);
        const acc_t wj = c * dsj * qinv * kinv[h];
        p[r * Lk + j] = pj;
        wqk[r * Lk + j] = wj;
        wd[j] = wj;  // reused below as grad_query's key weights
        psum += pj;
      }
    }
    psum = warp_sum(psum);
    __syncwarp();
    if (dq != nullptr) {
      // grad_query = sum_j wqk_j k_j - q * (F.normalize's projection term; zero where the norm
      // was clamped to eps).
      const acc_t rc = normalize && qn >= eps ? qinv * qinv * c * psum : acc_t(0);
      for (int64_t d = lane; d < D; d += kWarp) {
        acc_t o = -rc * static_cast<acc_t>(qr[d]);
        for (int j = 0; j < Lk; ++j) {
          const acc_t wj = wd[j];
          if (wj != acc_t(0)) o += wj * static_cast<acc_t>(kr[j * D + d]);
        }
        dq[r * D + d] = static_cast<scalar_t>(o);
      }
    }
    __syncwarp();
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gemm_logit(const scalar_t* S, const bool* mask, const acc_t* knrm,
                                            const Strides& st, int64_t r, int64_t b, int64_t j, int64_t Lk,
                                            acc_t c, acc_t qinv) {
  if (mask != nullptr && !mask[b * st.mb + j]) return ninf<acc_t>();
  const acc_t kinv = knrm ? inv_norm(knrm[b * st.nb + j]) : acc_t(1);
  return c * (static_cast<acc_t>(S[r * Lk + j]) * qinv * kinv);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_forward_kernel(const scalar_t* __restrict__ S, const bool* __restrict__ mask,
                           const acc_t* __restrict__ qnrm, const acc_t* __restrict__ knrm, Strides st,
                           const void* lsl, int lsl_code, double max_scale, int64_t R, int64_t Lq, int64_t Lk,
                           scalar_t* __restrict__ attn) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const acc_t c = static_cast<acc_t>(load_scale(lsl, lsl_code, max_scale));
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp; r < R;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = r / Lq;
    const acc_t qinv = qnrm ? inv_norm(qnrm[r]) : acc_t(1);
    acc_t m = ninf<acc_t>();
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t l = gemm_logit(S, mask, knrm, st, r, b, j, Lk, c, qinv);
      m = (l > m || l != l) ? l : m;
    }
    m = warp_max(m);
    if (m == ninf<acc_t>()) {  // no valid key: zeros
      for (int64_t j = lane; j < Lk; j += kWarp) attn[r * Lk + j] = scalar_t(0);
      continue;
    }
    acc_t sum = 0;
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t l = gemm_logit(S, mask, knrm, st, r, b, j, Lk, c, qinv);
      sum += l == ninf<acc_t>() ? acc_t(0) : dev_exp_diff(l, m);
    }
    const acc_t inv = acc_t(1) / warp_sum(sum);
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t l = gemm_logit(S, mask, knrm, st, r, b, j, Lk, c, qinv);
      attn[r * Lk + j] = static_cast<scalar_t>(l == ninf<acc_t>() ? acc_t(0) : dev_exp_diff(l, m) * inv);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_kernel(const scalar_t* __restrict__ S, const scalar_t* __restrict__ dA,
                            const scalar_t* __restrict__ gattn, const scalar_t* __restrict__ attn,
                            const acc_t* __restrict__ qnrm, const acc_t* __restrict__ knrm, Strides st,
                            const void* lsl, int lsl_code, double max_scale, int64_t R, int64_t Lq,
                            int64_t Lk, acc_t* __restrict__ wqk, acc_t* __restrict__ p,
                            acc_t* __restrict__ rowcoef) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const acc_t c = static_cast<acc_t>(load_scale(lsl, lsl_code, max_scale));
  const acc_t eps = static_cast<acc_t>(kXattnNormEps);
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp; r < R;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = r / Lq;
    const acc_t qn = qnrm ? qnrm[r] : acc_t(1);
    const acc_t qinv = qnrm ? inv_norm(qn) : acc_t(1);
    acc_t s = 0, best = acc_t(-1);
    int64_t bestj = INT64_MAX;
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t a = static_cast<acc_t>(attn[r * Lk + j]);
      if (a != acc_t(0)) {
        s += a * (static_cast<acc_t>(dA[r * Lk + j]) +
                  (gattn ? static_cast<acc_t>(gattn[r * Lk + j]) : acc_t(0)));
        if (a > best) {
          best = a;
          bestj = j;
        }
      }
    }
    s = warp_sum(s);
    const int64_t jm = warp_argmax(best, bestj);
    // minus the float sum of the softmax gradient goes to the arg-max key (see the fused kernel)
    acc_t dsum = 0;
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t a = static_cast<acc_t>(attn[r * Lk + j]);
      const acc_t da =
          static_cast<acc_t>(dA[r * Lk + j]) + (gattn ? static_cast<acc_t>(gattn[r * Lk + j]) : acc_t(0));
      dsum += a != acc_t(0) ? a * (da - s) : acc_t(0);
    }
    dsum = warp_sum(dsum);
    acc_t psum = 0;
    for (int64_t j = lane; j < Lk; j += kWarp) {
      const acc_t a = static_cast<acc_t>(attn[r * Lk + j]);
      const acc_t da =
          static_cast<acc_t>(dA[r * Lk + j]) + (gattn ? static_cast<acc_t>(gattn[r * Lk + j]) : acc_t(0));
      const acc_t kinv = knrm ? inv_norm(knrm[b * st.nb + j]) : acc_t(1);
      acc_t ds = a != acc_t(0) ? a * (da - s) : acc_t(0);
      if (j == jm) ds -= dsum;
      const acc_t pj = ds * (static_cast<acc_t>(S[r * Lk + j]) * qinv * kinv);
      p[r * Lk + j] = pj;
      wqk[r * Lk + j] = c * ds * qinv * kinv;
      psum += pj;
    }
    psum = warp_sum(psum);
    if (lane == 0) rowcoef[r] = qnrm && qn >= eps ? qinv * qinv * c * psum : acc_t(0);
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor row_norms_cuda(const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), M = x.size(1), D = x.size(2);
  at::Tensor out = at::empty({N * M}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (N * M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xattn_row_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_norms_kernel<scalar_t, acc_t><<<num_blocks(N * M), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), N, M, D, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void fused_forward_cuda(const XattnArgs& a, const at::Tensor& knrm, double max_scale, bool normalize,
                        const at::Tensor& out, const at::Tensor& attn) {
  c10::cuda::CUDAGuard guard(a.q.device());
  const int64_t R = a.B * a.Lq;
  TORCH_INTERNAL_ASSERT(a.Lk <= kMaxFusedKeys && R > 0);
  const Strides st = make_strides(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        fused_forward_kernel<scalar_t, acc_t>
            <<<num_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                a.q.const_data_ptr<scalar_t>(), a.k.const_data_ptr<scalar_t>(),
                a.v.const_data_ptr<scalar_t>(), opt_ptr<bool>(a.mask),
                normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(),
                scale_code(a.lsl), max_scale, R, a.Lq, static_cast<int>(a.Lk), a.D, a.Dv,
                out.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void softmax_forward_cuda(const XattnArgs& a, const at::Tensor& S, const at::Tensor& qnrm,
                          const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& attn) {
  c10::cuda::CUDAGuard guard(a.q.device());
  const int64_t R = a.B * a.Lq;
  const Strides st = make_strides(a);
  const at::Tensor Sc = S.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_softmax_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        softmax_forward_kernel<scalar_t, acc_t>
            <<<num_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                Sc.const_data_ptr<scalar_t>(), opt_ptr<bool>(a.mask),
                normalize ? qnrm.const_data_ptr<acc_t>() : nullptr,
                normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(),
                scale_code(a.lsl), max_scale, R, a.Lq, a.Lk, attn.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void fused_backward_cuda(const XattnArgs& a, const at::Tensor& knrm, const at::Tensor& gout,
                         const at::Tensor& gattn, const at::Tensor& attn, double max_scale, bool normalize,
                         const at::Tensor& dq, const at::Tensor& wqk, const at::Tensor& p) {
  c10::cuda::CUDAGuard guard(a.q.device());
  const int64_t R = a.B * a.Lq;
  TORCH_INTERNAL_ASSERT(a.Lk <= kMaxFusedKeys && R > 0);
  const Strides st = make_strides(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        fused_backward_kernel<scalar_t, acc_t>
            <<<num_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                a.q.const_data_ptr<scalar_t>(), a.k.const_data_ptr<scalar_t>(),
                a.v.const_data_ptr<scalar_t>(), normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st,
                gout.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(gattn), attn.const_data_ptr<scalar_t>(),
                a.lsl.const_data_ptr(), scale_code(a.lsl), max_scale, R, a.Lq, static_cast<int>(a.Lk), a.D,
                a.Dv, dq.defined() ? dq.data_ptr<scalar_t>() : nullptr, wqk.data_ptr<acc_t>(),
                p.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void softmax_backward_cuda(const XattnArgs& a, const at::Tensor& S, const at::Tensor& dA,
                           const at::Tensor& gattn, const at::Tensor& attn, const at::Tensor& qnrm,
                           const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& wqk,
                           const at::Tensor& p, const at::Tensor& rowcoef) {
  c10::cuda::CUDAGuard guard(a.q.device());
  const int64_t R = a.B * a.Lq;
  const Strides st = make_strides(a);
  const at::Tensor Sc = S.contiguous(), dAc = dA.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_softmax_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        softmax_backward_kernel<scalar_t, acc_t>
            <<<num_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                Sc.const_data_ptr<scalar_t>(), dAc.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(gattn),
                attn.const_data_ptr<scalar_t>(), normalize ? qnrm.const_data_ptr<acc_t>() : nullptr,
                normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(),
                scale_code(a.lsl), max_scale, R, a.Lq, a.Lk, wqk.data_ptr<acc_t>(), p.data_ptr<acc_t>(),
                rowcoef.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

const XattnKernels& cuda_kernels() {
  static const XattnKernels k{
      kMaxFusedKeys,
      &row_norms_cuda,
      &fused_forward_cuda,
      &softmax_forward_cuda,
      &fused_backward_cuda,
      &softmax_backward_cuda,
      [] { return at::cuda::currentStreamCaptureStatusMayInitCtx() == at::cuda::CaptureStatus::None; },
      /*gemm_in_acc=*/false};
  return k;
}

std::tuple<at::Tensor, at::Tensor> scaled_cross_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                               const at::Tensor& value, const at::Tensor& lsl,
                                                               double max_scale,
                                                               const std::optional<at::Tensor>& key_mask,
                                                               bool normalize) {
  c10::cuda::CUDAGuard guard(query.device());
  return xattn_forward(query, key, value, lsl, max_scale, key_mask, normalize, cuda_kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_cross_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& lsl, const at::Tensor& attn,
    double max_scale, bool normalize, std::array<bool, 4> output_mask) {
  c10::cuda::CUDAGuard guard(query.device());
  return xattn_backward(grad_out, grad_attn, query, key, value, lsl, attn, max_scale, normalize, output_mask,
                        cuda_kernels());
}

}  // namespace
}  // namespace maskattn

TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("scaled_cross_attention", &maskattn::scaled_cross_attention_cuda);
  m.impl("_scaled_cross_attention_backward", &maskattn::scaled_cross_attention_backward_cuda);
}
