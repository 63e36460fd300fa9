// CUDA row kernels of scaled_cross_attention: one warp per query row.
//
// Few keys (Lk <= 64, the few-shot case): the warp reads its query row once per tile of eight
// keys (the row stays in L1), reduces the dot products with shuffles, does the softmax with one
// or two keys per lane, and writes the output row; the keys and values (a few KiB) are shared by
// all warps through L1/L2. The scale is read from device memory inside the kernel, so nothing
// waits for the host. The backward kernel recomputes the row's logits the same way and writes
// grad_query in the same visit; the reductions over rows (grad_key, grad_value) are cuBLAS GEMMs
// in the shared driver.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "scaled_cross_attention.h"

namespace maskattn {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxFusedKeys = 2 * kWarp;  // the softmax holds at most two keys per lane
constexpr int kKeyTile = 8;

using cuda::warp_max;  // NaN wins: an all-NaN row is NaN, not "no valid key"
using cuda::warp_sum;

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

int scale_code(const st::Tensor& lsl) {
  switch (lsl.scalar_type()) {
    case st::ScalarType::Float:
      return kScaleF32;
    case st::ScalarType::Double:
      return kScaleF64;
    case st::ScalarType::Half:
      return kScaleF16;
    case st::ScalarType::BFloat16:
      return kScaleBF16;
    default:
      MASKATTN_CHECK(false, "scaled_cross_attention: logit_scale_log has unsupported dtype ",
                     st::dtype_str(lsl));
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

// ---- The elementwise glue between the driver's GEMMs (the stable ABI passes no Scalar argument
// to ATen's elementwise ops, and each boxed call would cost microseconds of host time).

template <typename T>
__device__ __forceinline__ bool dev_is_zero(T x) {
  return static_cast<st::acc_t<T>>(x) == st::acc_t<T>(0);
}

template <typename T>
__device__ __forceinline__ bool dev_is_finite(T x) {
  return ::isfinite(static_cast<st::acc_t<T>>(x));
}

constexpr int kGlueThreads = 256;

int64_t glue_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kGlueThreads - 1) / kGlueThreads, int64_t(1) << 20));
}

// dead[b * Lk + j] (preset to 1) = 0 where a row of sample b weighs key j. Threads run along keys
// (coalesced); blockIdx.z splits the rows, and any thread that finds a weight writes the 0 (all
// writers write the same value).
template <typename scalar_t>
__global__ void __launch_bounds__(kGlueThreads)
    dead_keys_kernel(const scalar_t* __restrict__ attn, int64_t B, int64_t Lq, int64_t Lk, int64_t rows_per_z,
                     uint8_t* __restrict__ dead) {
  const int64_t j = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x;
  if (j >= Lk) return;
  const int64_t i0 = int64_t(blockIdx.z) * rows_per_z, i1 = std::min(Lq, i0 + rows_per_z);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    bool alive = false;
    for (int64_t i = i0; i < i1; ++i) alive = alive || !dev_is_zero(attn[(b * Lq + i) * Lk + j]);
    if (alive) dead[b * Lk + j] = 0;
  }
}

// Shared values read by B > 1 samples: dead_all[j] = key j is dead for every sample; with flag, also
// *flag = 1 if a key dead for some samples only has a non-finite value.
template <typename scalar_t>
__global__ void __launch_bounds__(kGlueThreads)
    shared_dead_kernel(const uint8_t* __restrict__ dead, int64_t B, int64_t Lk,
                       const scalar_t* __restrict__ v, int64_t Dv, uint8_t* __restrict__ dead_all,
                       int* __restrict__ flag) {
  for (int64_t j = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x; j < Lk;
       j += int64_t(gridDim.x) * kGlueThreads) {
    bool all = true, any = false;
    for (int64_t b = 0; b < B; ++b) {
      all = all && dead[b * Lk + j];
      any = any || dead[b * Lk + j];
    }
    dead_all[j] = all;
    if (flag != nullptr && any && !all) {
      for (int64_t d = 0; d < Dv; ++d) {
        if (!dev_is_finite(v[j * Dv + d])) {
          *flag = 1;
          break;
        }
      }
    }
  }
}

// out [Bo, Lk, Dv] = v (batch Bv: 1 or Bo) with the rows where dead[n] (n = b * Lk + j) zeroed.
template <typename scalar_t>
__global__ void __launch_bounds__(kGlueThreads)
    clear_values_kernel(const scalar_t* __restrict__ v, int64_t Bv, const uint8_t* __restrict__ dead,
                        int64_t Lk, int64_t Dv, int64_t total, scalar_t* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kGlueThreads) {
    const int64_t n = e / Dv, d = e - n * Dv;
    const int64_t b = n / Lk, j = n - b * Lk;
    out[e] = dead[n] ? scalar_t(0) : v[((Bv == 1 ? 0 : b) * Lk + j) * Dv + d];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGlueThreads)
    finite_keys_kernel(const scalar_t* __restrict__ x, int64_t total, scalar_t* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kGlueThreads) {
    const scalar_t v = x[e];
    out[e] = dev_is_finite(v) ? v : scalar_t(0);
  }
}

__device__ __forceinline__ float dev_fma(float a, float b, float c) {
  return ::fmaf(a, b, c);
}
__device__ __forceinline__ double dev_fma(double a, double b, double c) {
  return ::fma(a, b, c);
}

// out [rows, D] = g - x * coef per row, in acc_t, rounded once as the eager composition's
// addcmul_ (its multiply-add is contracted into an FMA); row n of x at (n / M) * s0 + (n % M) * s1.
template <typename scalar_t, typename g_t, typename acc_t>
__global__ void __launch_bounds__(kGlueThreads)
    minus_product_kernel(const g_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t s0, int64_t s1,
                         int64_t M, int64_t D, const acc_t* __restrict__ coef, int64_t total,
                         scalar_t* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kGlueThreads) {
    const int64_t n = e / D, d = e - n * D;
    const acc_t xv = static_cast<acc_t>(x[(n / M) * s0 + (n % M) * s1 + d]);
    out[e] = static_cast<scalar_t>(dev_fma(-xv, coef[n], static_cast<acc_t>(g[e])));
  }
}

// torch.clamp(exp(lsl), max=max_scale) in lsl's dtype (the cap rounded to it, NaN kept), from
// ATen's exp(lsl) in device memory.
template <typename T>
__device__ __forceinline__ double clamp_in(const void* e, double max_scale) {
  const T s = *static_cast<const T*>(e);
  const T m = static_cast<T>(max_scale);
  return static_cast<double>(s) > static_cast<double>(m) ? static_cast<double>(m) : static_cast<double>(s);
}

__device__ __forceinline__ double clamped_exp(const void* e, int code, double max_scale) {
  switch (code) {
    case kScaleF64:
      return clamp_in<double>(e, max_scale);
    case kScaleF16:
      return clamp_in<c10::Half>(e, max_scale);
    case kScaleBF16:
      return clamp_in<c10::BFloat16>(e, max_scale);
    default:
      return clamp_in<float>(e, max_scale);
  }
}

// coef = knrm >= eps ? scale / max(knrm, eps)^2 * colsum : 0 per key.
template <typename acc_t>
__global__ void __launch_bounds__(kGlueThreads)
    key_coef_kernel(const acc_t* __restrict__ colsum, const acc_t* __restrict__ knrm, int64_t n,
                    const void* lsl_exp, int lsl_code, double max_scale, acc_t* __restrict__ coef) {
  const acc_t c = static_cast<acc_t>(clamped_exp(lsl_exp, lsl_code, max_scale));
  const acc_t eps = static_cast<acc_t>(kXattnNormEps);
  for (int64_t i = int64_t(blockIdx.x) * kGlueThreads + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kGlueThreads) {
    const acc_t kn = knrm[i];
    const acc_t kinv = acc_t(1) / (kn > eps || kn != kn ? kn : eps);
    coef[i] = kn >= eps ? kinv * kinv * c * colsum[i] : acc_t(0);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_scale_grad(acc_t sum, const void* e, double max_scale, void* ds) {
  using opmath_t = st::acc_t<T>;
  const T s = *static_cast<const T*>(e);
  const T dc = static_cast<T>(sum);
  const bool passes = static_cast<double>(s) <= static_cast<double>(static_cast<T>(max_scale));
  *static_cast<T*>(ds) = passes ? static_cast<T>(static_cast<opmath_t>(dc) * static_cast<opmath_t>(s)) : T(0);
}

// d loss / d lsl = exp(lsl) <= max_scale ? T(sum p) * exp(lsl) : 0 in lsl's dtype T (one thread).
template <typename acc_t>
__global__ void scale_grad_kernel(const acc_t* __restrict__ psum, const void* lsl_exp, int lsl_code,
                                  double max_scale, void* ds) {
  switch (lsl_code) {
    case kScaleF64:
      store_scale_grad<double>(*psum, lsl_exp, max_scale, ds);
      break;
    case kScaleF16:
      store_scale_grad<c10::Half>(*psum, lsl_exp, max_scale, ds);
      break;
    case kScaleBF16:
      store_scale_grad<c10::BFloat16>(*psum, lsl_exp, max_scale, ds);
      break;
    default:
      store_scale_grad<float>(*psum, lsl_exp, max_scale, ds);
      break;
  }
}

// ---- host side

template <typename T>
const T* opt_ptr(const st::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

st::Tensor row_norms_cuda(const st::Tensor& x) {
  const int32_t di = x.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t N = x.size(0), M = x.size(1), D = x.size(2);
  st::Tensor out = st::empty({N * M}, st::acc_dtype(x.scalar_type()), x.device());
  if (N * M == 0) return out;
  const cudaStream_t stream = st::current_stream(di);
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    row_norms_kernel<scalar_t, acc_t><<<num_blocks(N * M), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), N, M, D, out.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
  return out;
}

void fused_forward_cuda(const XattnArgs& a, const st::Tensor& knrm, double max_scale, bool normalize,
                        const st::Tensor& out, const st::Tensor& attn) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t R = a.B * a.Lq;
  MASKATTN_CHECK(a.Lk <= kMaxFusedKeys && R > 0,
                 "scaled_cross_attention: internal error: fused path with Lk = ", a.Lk, ", R = ", R);
  const Strides st = make_strides(a);
  const cudaStream_t stream = st::current_stream(di);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    fused_forward_kernel<scalar_t, acc_t><<<num_blocks(R), kThreads, 0, stream>>>(
        a.q.const_data_ptr<scalar_t>(), a.k.const_data_ptr<scalar_t>(), a.v.const_data_ptr<scalar_t>(),
        opt_ptr<bool>(a.mask), normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(),
        scale_code(a.lsl), max_scale, R, a.Lq, static_cast<int>(a.Lk), a.D, a.Dv,
        out.mutable_data_ptr<scalar_t>(), attn.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
}

void softmax_forward_cuda(const XattnArgs& a, const st::Tensor& S, const st::Tensor& qnrm,
                          const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& attn) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t R = a.B * a.Lq;
  const Strides st = make_strides(a);
  const cudaStream_t stream = st::current_stream(di);
  // S is contiguous (the driver's GEMM result)
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    softmax_forward_kernel<scalar_t, acc_t><<<num_blocks(R), kThreads, 0, stream>>>(
        S.const_data_ptr<scalar_t>(), opt_ptr<bool>(a.mask),
        normalize ? qnrm.const_data_ptr<acc_t>() : nullptr,
        normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(), scale_code(a.lsl),
        max_scale, R, a.Lq, a.Lk, attn.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
}

void fused_backward_cuda(const XattnArgs& a, const st::Tensor& knrm, const st::Tensor& gout,
                         const st::Tensor& gattn, const st::Tensor& attn, double max_scale, bool normalize,
                         const st::Tensor& dq, const st::Tensor& wqk, const st::Tensor& p) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t R = a.B * a.Lq;
  MASKATTN_CHECK(a.Lk <= kMaxFusedKeys && R > 0,
                 "_scaled_cross_attention_backward: internal error: fused path with Lk = ", a.Lk,
                 ", R = ", R);
  const Strides st = make_strides(a);
  const cudaStream_t stream = st::current_stream(di);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    fused_backward_kernel<scalar_t, acc_t><<<num_blocks(R), kThreads, 0, stream>>>(
        a.q.const_data_ptr<scalar_t>(), a.k.const_data_ptr<scalar_t>(), a.v.const_data_ptr<scalar_t>(),
        normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, gout.const_data_ptr<scalar_t>(),
        opt_ptr<scalar_t>(gattn), attn.const_data_ptr<scalar_t>(), a.lsl.const_data_ptr(), scale_code(a.lsl),
        max_scale, R, a.Lq, static_cast<int>(a.Lk), a.D, a.Dv,
        dq.defined() ? dq.mutable_data_ptr<scalar_t>() : nullptr, wqk.mutable_data_ptr<acc_t>(),
        p.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
}

void softmax_backward_cuda(const XattnArgs& a, const st::Tensor& S, const st::Tensor& dA,
                           const st::Tensor& gattn, const st::Tensor& attn, const st::Tensor& qnrm,
                           const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& wqk,
                           const st::Tensor& p, const st::Tensor& rowcoef) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t R = a.B * a.Lq;
  const Strides st = make_strides(a);
  const cudaStream_t stream = st::current_stream(di);
  // S and dA are contiguous (the driver's GEMM results)
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    softmax_backward_kernel<scalar_t, acc_t><<<num_blocks(R), kThreads, 0, stream>>>(
        S.const_data_ptr<scalar_t>(), dA.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(gattn),
        attn.const_data_ptr<scalar_t>(), normalize ? qnrm.const_data_ptr<acc_t>() : nullptr,
        normalize ? knrm.const_data_ptr<acc_t>() : nullptr, st, a.lsl.const_data_ptr(), scale_code(a.lsl),
        max_scale, R, a.Lq, a.Lk, wqk.mutable_data_ptr<acc_t>(), p.mutable_data_ptr<acc_t>(),
        rowcoef.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
}

// Not while the current stream is being captured into a CUDA graph (a sync is an error there). The
// stable ABI has no capture query: ask the runtime about the stream PyTorch launches on.
bool may_sync_cuda() {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  MASKATTN_CHECK(err == cudaSuccess, "maskattn: cudaGetDevice failed: ", cudaGetErrorString(err));
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  err = cudaStreamIsCapturing(st::current_stream(dev), &status);
  MASKATTN_CHECK(err == cudaSuccess, "maskattn: cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  return status == cudaStreamCaptureStatusNone;
}

// Looking for a zero weight would be a host sync: assume there is one.
bool may_have_dead_rows_cuda(const st::Tensor&) {
  return true;
}

st::Tensor cleared_values_cuda(const XattnArgs& a, const st::Tensor& attn, st::ScalarType out_dt) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const cudaStream_t stream = st::current_stream(di);
  const st::Device dev = a.v.device();
  const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, Dv = a.Dv, Bv = a.v.size(0);
  MASKATTN_CHECK(out_dt == a.v.scalar_type(), "scaled_cross_attention: internal error: values in ",
                 torch::headeronly::toString(out_dt));
  st::Tensor dead = st::empty({B, Lk}, st::ScalarType::Byte, dev);
  torch::stable::fill_(dead, 1.0);
  bool per_sample = Bv != 1 || B == 1;
  st::Tensor dead_all;
  dispatch_floating(a.v.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (B * Lk * Lq > 0) {
      const int64_t zs = std::min<int64_t>((Lq + 63) / 64, 65535);
      const int64_t rows_per_z = (Lq + zs - 1) / zs;
      const dim3 grid(static_cast<unsigned>((Lk + kGlueThreads - 1) / kGlueThreads),
                      static_cast<unsigned>(std::min<int64_t>(B, 65535)), static_cast<unsigned>(zs));
      dead_keys_kernel<scalar_t><<<grid, kGlueThreads, 0, stream>>>(
          attn.const_data_ptr<scalar_t>(), B, Lq, Lk, rows_per_z, dead.mutable_data_ptr<uint8_t>());
      MASKATTN_CUDA_LAUNCH_CHECK();
    }
    if (!per_sample) {
      // Per-sample masks are the one case where a row can be dead for some samples only with finite
      // logits everywhere: only then is the flag read back (a sync), and never during a capture.
      const bool per_sample_mask = a.mask.defined() && a.mask.size(0) > 1;
      const bool ask = per_sample_mask && may_sync_cuda();
      dead_all = st::empty({Lk}, st::ScalarType::Byte, dev);
      st::Tensor flag = ask ? st::zeros({1}, st::ScalarType::Int, dev) : st::Tensor();
      shared_dead_kernel<scalar_t><<<glue_blocks(Lk), kGlueThreads, 0, stream>>>(
          dead.const_data_ptr<uint8_t>(), B, Lk, a.v.const_data_ptr<scalar_t>(), Dv,
          dead_all.mutable_data_ptr<uint8_t>(), ask ? flag.mutable_data_ptr<int>() : nullptr);
      MASKATTN_CUDA_LAUNCH_CHECK();
      bool copy = per_sample_mask;
      if (ask) {
        int h = 0;
        cudaError_t err =
            cudaMemcpyAsync(&h, flag.const_data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream);
        if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
        MASKATTN_CHECK(err == cudaSuccess, "scaled_cross_attention: reading a flag from the device failed: ",
                       cudaGetErrorString(err));
        copy = h != 0;
      }
      per_sample = copy;
    }
  });
  const int64_t Bo = per_sample ? B : 1;
  st::Tensor out = st::empty({Bo, Lk, Dv}, out_dt, dev);
  const int64_t total = Bo * Lk * Dv;
  if (total == 0) return out;
  const st::Tensor& dd = per_sample ? dead : dead_all;
  dispatch_floating(a.v.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    clear_values_kernel<scalar_t><<<glue_blocks(total), kGlueThreads, 0, stream>>>(
        a.v.const_data_ptr<scalar_t>(), Bv, dd.const_data_ptr<uint8_t>(), Lk, Dv, total,
        out.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
  return out;
}

st::Tensor finite_keys_cuda(const st::Tensor& x) {
  const int32_t di = x.get_device_index();
  const st::DeviceGuard guard(di);
  st::Tensor out = st::empty({x.size(0), x.size(1), x.size(2)}, x.scalar_type(), x.device());
  const int64_t total = x.numel();
  if (total == 0) return out;
  const cudaStream_t stream = st::current_stream(di);
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    finite_keys_kernel<scalar_t><<<glue_blocks(total), kGlueThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), total, out.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
  return out;
}

st::Tensor minus_product_cuda(const st::Tensor& g, const st::Tensor& x, const st::Tensor& coef) {
  const int32_t di = x.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t M = x.size(1), D = x.size(2), total = x.size(0) * M * D;
  const auto gs = g.sizes();
  st::Tensor out = st::empty(gs.data(), static_cast<int64_t>(gs.size()), x.scalar_type(), x.device());
  if (total == 0) return out;
  const cudaStream_t stream = st::current_stream(di);
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const auto run = [&](auto gtag) {
      using g_t = decltype(gtag);
      minus_product_kernel<scalar_t, g_t, acc_t><<<glue_blocks(total), kGlueThreads, 0, stream>>>(
          g.const_data_ptr<g_t>(), x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), M, D,
          coef.const_data_ptr<acc_t>(), total, out.mutable_data_ptr<scalar_t>());
      MASKATTN_CUDA_LAUNCH_CHECK();
    };
    if (g.scalar_type() == x.scalar_type()) {
      run(scalar_t{});
    } else {
      run(acc_t{});
    }
  });
  return out;
}

st::Tensor key_coef_cuda(const XattnArgs& a, const st::Tensor& colsum, const st::Tensor& knrm,
                         double max_scale) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const int64_t n = a.k.size(0) * a.Lk;
  const st::Tensor& e = xattn_lsl_exp(a);
  st::Tensor coef = st::empty({n}, colsum.scalar_type(), colsum.device());
  if (n == 0) return coef;
  const cudaStream_t stream = st::current_stream(di);
  dispatch_acc(colsum.scalar_type(), [&](auto tag) {
    using acc_t = decltype(tag);
    key_coef_kernel<acc_t><<<glue_blocks(n), kGlueThreads, 0, stream>>>(
        colsum.const_data_ptr<acc_t>(), knrm.const_data_ptr<acc_t>(), n, e.const_data_ptr(), scale_code(e),
        max_scale, coef.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
  return coef;
}

st::Tensor scale_grad_cuda(const XattnArgs& a, const st::Tensor& psum, double max_scale) {
  const int32_t di = a.q.get_device_index();
  const st::DeviceGuard guard(di);
  const st::Tensor& e = xattn_lsl_exp(a);
  st::Tensor ds = st::empty({}, e.scalar_type(), e.device());
  const cudaStream_t stream = st::current_stream(di);
  dispatch_acc(psum.scalar_type(), [&](auto tag) {
    using acc_t = decltype(tag);
    scale_grad_kernel<acc_t><<<1, 1, 0, stream>>>(psum.const_data_ptr<acc_t>(), e.const_data_ptr(),
                                                  scale_code(e), max_scale, ds.mutable_data_ptr());
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
  return ds;
}

const XattnKernels& cuda_kernels() {
  static const XattnKernels k{
      kMaxFusedKeys,        &row_norms_cuda,        &fused_forward_cuda,      &softmax_forward_cuda,
      &fused_backward_cuda, &softmax_backward_cuda, &may_have_dead_rows_cuda, &cleared_values_cuda,
      &finite_keys_cuda,    &minus_product_cuda,    &key_coef_cuda,           &scale_grad_cuda,
      &may_sync_cuda,
      /*gemm_in_acc=*/false};
  return k;
}

std::tuple<st::Tensor, st::Tensor> scaled_cross_attention_cuda(const st::Tensor& query, const st::Tensor& key,
                                                               const st::Tensor& value, const st::Tensor& lsl,
                                                               double max_scale,
                                                               const std::optional<st::Tensor>& key_mask,
                                                               bool normalize) {
  const st::DeviceGuard guard(query.get_device_index());
  return xattn_forward(query, key, value, lsl, max_scale, key_mask, normalize, cuda_kernels());
}

std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor> scaled_cross_attention_backward_cuda(
    const st::Tensor& grad_out, const std::optional<st::Tensor>& grad_attn, const st::Tensor& query,
    const st::Tensor& key, const st::Tensor& value, const st::Tensor& lsl, const st::Tensor& attn,
    double max_scale, bool normalize, std::vector<bool> output_mask) {
  const st::DeviceGuard guard(query.get_device_index());
  return xattn_backward(grad_out, grad_attn, query, key, value, lsl, attn, max_scale, normalize, output_mask,
                        cuda_kernels());
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("scaled_cross_attention", TORCH_BOX(&maskattn::scaled_cross_attention_cuda));
  m.impl("_scaled_cross_attention_backward", TORCH_BOX(&maskattn::scaled_cross_attention_backward_cuda));
}
