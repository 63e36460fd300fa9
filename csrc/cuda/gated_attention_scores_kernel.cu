// CUDA kernels of gated_attention_scores and its backward.
//
// Forward: a group of G threads (a power of two up to a warp, sized to the row) per row of H. Each
// thread walks the row VEC elements at a time, adds the input layers' biases, forms act(v) * sigmoid(u)
// in registers and folds it into up to KB dot products with weight (read through L1 like the biases:
// K x H is small and every row reuses it); the group sums them with shuffles. v_pre and u_pre are read
// once and nothing of size [M, H] is stored; K above KB takes the row again per KB outputs, from L1.
//
// Backward: a block is a tile of columns (tx threads, VEC columns each) by ty thread rows over one
// slice of the rows. grad_v and grad_u need no reduction over H, so a thread reads its columns of a
// row once, writes their two gradients and keeps in registers its columns' weight-gradient sums and
// its columns' sums of grad_v and grad_u over rows (the input layers' bias gradients, taken from the
// unrounded values whether or not grad_v / grad_u are written). A block adds its thread rows pairwise
// in shared memory into the slice's partial [K, H] (+ [K]) (+ [H] + [H]); a second kernel sums the
// slices in a fixed order. No atomics: no gradient that is a sum over rows depends on timing. K above
// kMaxKB takes further passes for the weight gradient, each reading the rows again.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "gated_attention_scores.h"

namespace maskattn {
namespace {

using cuda::ceil_div;

constexpr int kThreads = 256;
// Weight-gradient rows a backward thread keeps in registers (KB x VEC sums); also the forward's
// widest set of dot products per pass over a row.
constexpr int kMaxKB = 8;
constexpr int kCombineX = 32, kCombineY = 8;
// Rows a backward thread adds into its running weight-gradient sums before they go to the block's
// pairwise sum: the rounding error of a running sum grows with its length.
constexpr int kRowsPerThread = 32;

constexpr int kTanh = static_cast<int>(GateAct::kTanh);
constexpr int kRelu = static_cast<int>(GateAct::kRelu);
constexpr int kGelu = static_cast<int>(GateAct::kGelu);

constexpr double kSqrtHalf = 0.70710678118654752440;    // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

__device__ __forceinline__ float dev_tanh(float x) {
  return ::tanhf(x);
}
__device__ __forceinline__ double dev_tanh(double x) {
  return ::tanh(x);
}
__device__ __forceinline__ float dev_erf(float x) {
  return ::erff(x);
}
__device__ __forceinline__ double dev_erf(double x) {
  return ::erf(x);
}

// torch's form: 1 / (1 + e^-x). NaN stays NaN, -inf gives 0, +inf gives 1.
template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + cuda::dev_exp(-x));
}

// act(v); gelu also leaves Phi(v) in cdf for the backward. The forms are torch's (GeluCUDAKernelImpl,
// relu as clamp_min) so fused and unfused agree to rounding.
template <int ACT, typename T>
__device__ __forceinline__ T activate(T v, T& cdf) {
  if constexpr (ACT == kTanh) {
    return dev_tanh(v);
  } else if constexpr (ACT == kRelu) {
    return v < T(0) ? T(0) : v;  // a comparison, not fmax: NaN must stay NaN
  } else {
    cdf = T(0.5) * (T(1) + dev_erf(v * T(kSqrtHalf)));
    return v * cdf;
  }
}

// g * act'(v) given a = act(v). relu selects as torch's threshold_backward does on relu's output:
// an infinite g never turns a clamped element into NaN, and a NaN input passes g through.
template <int ACT, typename T>
__device__ __forceinline__ T act_backward(T g, T v, T a, T cdf) {
  if constexpr (ACT == kTanh) {
    return g * (T(1) - a * a);
  } else if constexpr (ACT == kRelu) {
    return a <= T(0) ? T(0) : g;
  } else {
    return g * (cdf + v * (cuda::dev_exp(T(-0.5) * v * v) * T(kInvSqrt2Pi)));
  }
}

// b[j, j + VEC) in acc_t, or -0 where there is no bias: x + -0 is x for every x, -0 and NaN included,
// so a missing bias changes no bit of the pre-activation.
template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void load_hidden_bias(const scalar_t* b, int64_t j, acc_t (&out)[VEC]) {
  if (b != nullptr) {
    const auto p = cuda::load_pack<scalar_t, VEC>(b + j);
#pragma unroll
    for (int t = 0; t < VEC; ++t) out[t] = static_cast<acc_t>(p.v[t]);
  } else {
#pragma unroll
    for (int t = 0; t < VEC; ++t) out[t] = acc_t(-0.0);
  }
}

// scores[m, k0 + k] for k < KB, k0 stepping through K. G threads per row, G a power of two <= 32.
// vb / ub ([H]) may be null.
template <typename scalar_t, int ACT, int VEC, int KB>
__global__ void __launch_bounds__(kThreads)
    gate_scores_kernel(const scalar_t* __restrict__ v, int64_t rsv, const scalar_t* __restrict__ u,
                       int64_t rsu, const scalar_t* __restrict__ vb, const scalar_t* __restrict__ ub,
                       const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias, int64_t M,
                       int64_t H, int64_t K, int G, scalar_t* __restrict__ out) {
  using acc_t = st::acc_t<scalar_t>;
  const int lane = threadIdx.x & (G - 1);
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int64_t ngroups = static_cast<int64_t>(gridDim.x) * blockDim.x / G;
  // The shuffles need every lane of the warp, so a warp's groups step through the rows together
  // (first is the same for the whole warp) and a group past M only skips the work.
  const int64_t gi = (threadIdx.x & 31) / G;
  const int64_t first = group - gi;
  for (int64_t mb = first; mb < M; mb += ngroups) {
    const int64_t m = mb + gi;
    const bool live = m < M;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      acc_t acc[KB];
#pragma unroll
      for (int k = 0; k < KB; ++k) acc[k] = acc_t(0);
      if (live) {
        const scalar_t* vr = v + m * rsv;
        const scalar_t* ur = u + m * rsu;
        for (int64_t j = static_cast<int64_t>(lane) * VEC; j < H; j += static_cast<int64_t>(G) * VEC) {
          const auto vp = cuda::load_pack<scalar_t, VEC>(vr + j);
          const auto up = cuda::load_pack<scalar_t, VEC>(ur + j);
          acc_t bv[VEC], bu[VEC], p[VEC];
          load_hidden_bias<scalar_t, VEC>(vb, j, bv);
          load_hidden_bias<scalar_t, VEC>(ub, j, bu);
#pragma unroll
          for (int t = 0; t < VEC; ++t) {
            acc_t cdf = acc_t(0);
            p[t] = activate<ACT>(static_cast<acc_t>(vp.v[t]) + bv[t], cdf) *
                   sigmoid(static_cast<acc_t>(up.v[t]) + bu[t]);
          }
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            if (k0 + k < K) {
              const auto wp = cuda::load_pack<scalar_t, VEC>(w + (k0 + k) * H + j);
#pragma unroll
              for (int t = 0; t < VEC; ++t) acc[k] += p[t] * static_cast<acc_t>(wp.v[t]);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        for (int o = G >> 1; o > 0; o >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o);
      }
      if (live && lane == 0) {
#pragma unroll
        for (int k = 0; k < KB; ++k) {
          if (k0 + k < K) {
            const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[k0 + k]) : acc_t(0);
            out[m * K + k0 + k] = static_cast<scalar_t>(bias != nullptr ? acc[k] + b : acc[k]);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
struct BackwardParams {
  using acc_t = st::acc_t<scalar_t>;
  const acc_t* grad;  // [M, K], contiguous
  const scalar_t *v, *u, *w;
  const scalar_t *vb, *ub;  // [H] each, or null
  int64_t rsv, rsu, M, H, K;
  int64_t rows;    // rows per slice
  int64_t ctiles;  // column tiles per slice: blockIdx.x = slice * ctiles + tile
  int64_t k0;      // this pass sums weight-gradient rows [k0, k0 + kc)
  int kc;
  bool wgrad, bgrad;
  bool vbgrad, ubgrad;  // this pass sums grad_v / grad_u over rows
  scalar_t *gv, *gu;    // [M, H] contiguous; null where not written by this pass
  // [slices, nw]: weight partials at k * H + j, bias partials at boff + k, v_bias / u_bias partials at
  // vboff + j / uboff + j
  acc_t* part;
  int64_t nw, boff, vboff, uboff;
};

// Adds the block's TY thread rows of x pairwise in a fixed order (TY is a power of two) and has thread
// row 0 write the sums to dst[col, col + VEC). Every thread of the block calls it.
template <typename acc_t, int VEC>
__device__ __forceinline__ void sum_thread_rows(const acc_t (&x)[VEC], acc_t* red, int64_t col, int64_t H,
                                                acc_t* dst) {
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  acc_t* const mine = red + (ty * TX + tx) * VEC;
#pragma unroll
  for (int t = 0; t < VEC; ++t) mine[t] = x[t];
  __syncthreads();
  for (int h = TY >> 1; h > 0; h >>= 1) {
    if (ty < h) {
#pragma unroll
      for (int t = 0; t < VEC; ++t) mine[t] += mine[h * TX * VEC + t];
    }
    __syncthreads();
  }
  // H is a whole number of packs when VEC > 1, so a pack that starts in the row ends in it
  if (ty == 0 && col < H) {
#pragma unroll
    for (int t = 0; t < VEC; ++t) dst[col + t] = mine[t];
  }
  __syncthreads();
}

template <typename scalar_t, int ACT, int VEC, int KB>
__global__ void __launch_bounds__(kThreads) gate_scores_backward_kernel(const BackwardParams<scalar_t> P) {
  using acc_t = st::acc_t<scalar_t>;
  __shared__ acc_t red[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int64_t s = blockIdx.x / P.ctiles, ct = blockIdx.x % P.ctiles;
  const int64_t col = (ct * TX + tx) * VEC;
  const bool bias_lane = P.bgrad && ct == 0 && tx == 0;
  // c (below) feeds grad_v, grad_u and their sums over rows
  const bool need_c = P.gv != nullptr || P.gu != nullptr || P.vbgrad || P.ubgrad;
  const bool elems = col < P.H && (need_c || P.wgrad);
  const int64_t r0 = s * P.rows, r1 = r0 + P.rows < P.M ? r0 + P.rows : P.M;

  acc_t gw[KB][VEC], gb[KB], svb[VEC], sub[VEC], bv[VEC], bu[VEC];
#pragma unroll
  for (int k = 0; k < KB; ++k) {
    gb[k] = acc_t(0);
#pragma unroll
    for (int t = 0; t < VEC; ++t) gw[k][t] = acc_t(0);
  }
#pragma unroll
  for (int t = 0; t < VEC; ++t) svb[t] = sub[t] = acc_t(0);
  // A thread's columns are the same in every row: their biases are read once.
  load_hidden_bias<scalar_t, VEC>(elems ? P.vb : nullptr, col, bv);
  load_hidden_bias<scalar_t, VEC>(elems ? P.ub : nullptr, col, bu);

  for (int64_t m = r0 + ty; m < r1; m += TY) {
    const acc_t* g = P.grad + m * P.K;
    acc_t gk[KB];
    const bool sums = bias_lane || (elems && P.wgrad);
#pragma unroll
    for (int k = 0; k < KB; ++k) gk[k] = sums && k < P.kc ? g[P.k0 + k] : acc_t(0);
    if (bias_lane) {
#pragma unroll
      for (int k = 0; k < KB; ++k) gb[k] += gk[k];
    }
    if (!elems) continue;
    const auto vp = cuda::load_pack<scalar_t, VEC>(P.v + m * P.rsv + col);
    const auto up = cuda::load_pack<scalar_t, VEC>(P.u + m * P.rsu + col);
    // c = grad[m, :] . weight[:, j], over all of K whatever this pass's share of grad_weight
    acc_t c[VEC];
#pragma unroll
    for (int t = 0; t < VEC; ++t) c[t] = acc_t(0);
    if (need_c) {
      for (int64_t k = 0; k < P.K; ++k) {
        const acc_t gkk = g[k];
        const auto wp = cuda::load_pack<scalar_t, VEC>(P.w + k * P.H + col);
#pragma unroll
        for (int t = 0; t < VEC; ++t) c[t] += gkk * static_cast<acc_t>(wp.v[t]);
      }
    }
    cuda::Pack<scalar_t, VEC> yv, yu;
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      const acc_t x = static_cast<acc_t>(vp.v[t]) + bv[t];
      acc_t cdf = acc_t(0);
      const acc_t a = activate<ACT>(x, cdf);
      const acc_t sg = sigmoid(static_cast<acc_t>(up.v[t]) + bu[t]);
      // torch's unfused order: grad_a = c * s, grad_s = c * a, sigmoid_backward = dy * (1 - y) * y
      if (P.gv != nullptr || P.vbgrad) {
        const acc_t dv = act_backward<ACT>(c[t] * sg, x, a, cdf);
        yv.v[t] = static_cast<scalar_t>(dv);
        svb[t] += dv;
      }
      if (P.gu != nullptr || P.ubgrad) {
        const acc_t du = c[t] * a * (acc_t(1) - sg) * sg;
        yu.v[t] = static_cast<scalar_t>(du);
        sub[t] += du;
      }
      if (P.wgrad) {
        const acc_t p = a * sg;
#pragma unroll
        for (int k = 0; k < KB; ++k) gw[k][t] += gk[k] * p;
      }
    }
    if (P.gv != nullptr) cuda::store_pack<scalar_t, VEC>(P.gv + m * P.H + col, yv);
    if (P.gu != nullptr) cuda::store_pack<scalar_t, VEC>(P.gu + m * P.H + col, yu);
  }

  acc_t* const part = P.part + s * P.nw;
  if (P.wgrad) {
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < P.kc) sum_thread_rows<acc_t, VEC>(gw[k], red, col, P.H, part + (P.k0 + k) * P.H);
    }
  }
  if (P.vbgrad) sum_thread_rows<acc_t, VEC>(svb, red, col, P.H, part + P.vboff);
  if (P.ubgrad) sum_thread_rows<acc_t, VEC>(sub, red, col, P.H, part + P.uboff);
  if (P.bgrad && ct == 0) {
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < P.kc) {
        if (tx == 0) red[ty] = gb[k];
        __syncthreads();
        for (int h = TY >> 1; h > 0; h >>= 1) {
          if (tx == 0 && ty < h) red[ty] += red[ty + h];
          __syncthreads();
        }
        if (tid == 0) part[P.boff + P.k0 + k] = red[0];
        __syncthreads();
      }
    }
  }
}

// Where the outputs lie in a row of the partials: output o takes columns [end[o - 1], end[o]), from 0;
// an output that is not summed has an empty range and may be null.
template <typename scalar_t>
struct PartialOutputs {
  static constexpr int kN = 4;
  int64_t end[kN];
  scalar_t* out[kN];
};

// out[i] = sum over slices of part[slice, i], cast into the output whose range holds i. Thread row y
// sums a contiguous run of slices kFold at a time (the rounding error grows with kFold + run / kFold,
// not with the run), then the kCombineY rows are added pairwise.
template <typename scalar_t>
__global__ void __launch_bounds__(kCombineX* kCombineY)
    combine_partials_kernel(const st::acc_t<scalar_t>* __restrict__ part, int64_t slices, int64_t nw,
                            const PartialOutputs<scalar_t> outs) {
  using acc_t = st::acc_t<scalar_t>;
  __shared__ acc_t rows[kCombineY][kCombineX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kCombineX + tx;
  const int64_t run = ceil_div(slices, kCombineY);
  const int64_t s0 = ty * run, s1 = s0 + run < slices ? s0 + run : slices;
  acc_t sum = acc_t(0), sum_out = acc_t(0);
  if (i < nw) {
    int fold = 0;
    for (int64_t s = s0; s < s1; ++s) {
      sum += part[s * nw + i];
      if (++fold == cuda::kFold) {
        fold = 0;
        sum_out += sum;
        sum = acc_t(0);
      }
    }
  }
  rows[ty][tx] = sum + sum_out;
  __syncthreads();
#pragma unroll
  for (int h = kCombineY >> 1; h > 0; h >>= 1) {
    if (ty < h) rows[ty][tx] += rows[ty + h][tx];
    __syncthreads();
  }
  if (ty == 0 && i < nw) {
    int64_t start = 0;
#pragma unroll
    for (int o = 0; o < PartialOutputs<scalar_t>::kN; ++o) {
      if (i >= start && i < outs.end[o]) outs.out[o][i - start] = static_cast<scalar_t>(rows[0][tx]);
      start = outs.end[o];
    }
  }
}

// ------------------------------------------------------------------------------------------ host side

// gridDim.x is limited to 2^31 - 1: a larger int64 count passed straight to <<<>>> would be truncated.
unsigned grid_x(int64_t blocks, const char* op, const char* what) {
  MASKATTN_CHECK(blocks <= INT32_MAX, op, ": ", what, " = ", blocks,
                 " CUDA blocks exceeds the grid limit 2^31 - 1");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// Threads across one row: the smallest power of two covering its packs, at most a warp.
int row_threads(int64_t packs) {
  int g = 1;
  while (g < packs && g < 32) g <<= 1;
  return g;
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Packs of vec elements when H, both row strides and every non-null base pointer allow them.
bool rows_vectorisable(int vec, size_t elem, int64_t H, const GateInputs& in,
                       std::initializer_list<const void*> ptrs) {
  if (vec <= 1) return true;
  if (H % vec != 0 || in.v.rs % vec != 0 || in.u.rs % vec != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned(p, static_cast<int64_t>(vec * elem))) return false;
  }
  return true;
}

template <typename F>
void dispatch_act(GateAct act, F&& f) {
  switch (act) {
    case GateAct::kTanh:
      f(std::integral_constant<int, kTanh>{});
      break;
    case GateAct::kRelu:
      f(std::integral_constant<int, kRelu>{});
      break;
    case GateAct::kGelu:
      f(std::integral_constant<int, kGelu>{});
      break;
  }
}

// kb is a power of two in [1, kMaxKB].
template <typename F>
void dispatch_kb(int kb, F&& f) {
  switch (kb) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    default:
      f(std::integral_constant<int, kMaxKB>{});
      break;
  }
}

// Outputs per pass: K rounded up to a power of two, at most kMaxKB.
int kb_for(int64_t K) {
  int kb = 1;
  while (kb < K && kb < kMaxKB) kb <<= 1;
  return kb;
}

template <typename scalar_t>
const scalar_t* data_or_null(const st::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

st::Tensor gated_attention_scores_cuda(const st::Tensor& v_pre, const st::Tensor& u_pre,
                                       const st::Tensor& weight, const std::optional<st::Tensor>& bias,
                                       std::string act, const std::optional<st::Tensor>& v_bias,
                                       const std::optional<st::Tensor>& u_bias) {
  const char* op = "gated_attention_scores";
  const int32_t dev_index = v_pre.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const GateInputs in = check_gate_inputs(v_pre, u_pre, weight, bias, act, v_bias, u_bias, op);
  const int64_t M = in.v.M, H = in.v.H, K = in.K;
  st::Tensor out = st::empty(in.out_sizes.data(), static_cast<int64_t>(in.out_sizes.size()),
                             v_pre.scalar_type(), v_pre.device());
  if (M == 0 || K == 0) return out;
  const cudaStream_t stream = st::current_stream(dev_index);
  const int64_t sms = st::sm_count(dev_index);

  // A generic lambda outside the dispatch macro: the commas of <<<...>>> would split its arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = static_cast<int>(16 / sizeof(scalar_t));
    const scalar_t* vp = in.v.data.const_data_ptr<scalar_t>();
    const scalar_t* up = in.u.data.const_data_ptr<scalar_t>();
    const scalar_t* wp = in.weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = data_or_null<scalar_t>(in.bias);
    const scalar_t* vbp = data_or_null<scalar_t>(in.v_bias);
    const scalar_t* ubp = data_or_null<scalar_t>(in.u_bias);
    const bool vec = rows_vectorisable(V, sizeof(scalar_t), H, in, {vp, up, wp, vbp, ubp});
    const int G = row_threads(ceil_div(H, vec ? V : 1));
    // Enough blocks to fill the GPU; the kernel strides over the rest of the rows.
    const int64_t blocks = std::min<int64_t>(ceil_div(M, kThreads / G), 32 * sms);
    dispatch_act(in.act, [&](auto act_c) {
      dispatch_kb(kb_for(K), [&](auto kb_c) {
        auto launch = [&](auto vec_c) {
          gate_scores_kernel<scalar_t, decltype(act_c)::value, decltype(vec_c)::value, decltype(kb_c)::value>
              <<<grid_x(blocks, op, "blocks"), kThreads, 0, stream>>>(
                  vp, in.v.rs, up, in.u.rs, vbp, ubp, wp, bp, M, H, K, G, out.mutable_data_ptr<scalar_t>());
          MASKATTN_CUDA_LAUNCH_CHECK();
        };
        if (vec) {
          launch(std::integral_constant<int, V>{});
        } else {
          launch(std::integral_constant<int, 1>{});
        }
      });
    });
  };
  THO_DISPATCH_V2(v_pre.scalar_type(), "gated_attention_scores_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return out;
}

std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor, st::Tensor, st::Tensor>
gated_attention_scores_backward_cuda(const st::Tensor& grad, const st::Tensor& v_pre, const st::Tensor& u_pre,
                                     const st::Tensor& weight, std::string act,
                                     const std::optional<st::Tensor>& v_bias,
                                     const std::optional<st::Tensor>& u_bias, std::vector<bool> output_mask) {
  const char* op = "_gated_attention_scores_backward";
  const int32_t dev_index = v_pre.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const GateBackward g = prepare_gate_backward(grad, v_pre, u_pre, weight, act, v_bias, u_bias, output_mask);
  const GateInputs& in = g.in;
  const int64_t M = in.v.M, H = in.v.H, K = in.K;
  st::Tensor grad_v = g.grad_v, grad_u = g.grad_u, grad_weight = g.grad_weight, grad_bias = g.grad_bias;
  st::Tensor grad_v_bias = g.grad_v_bias, grad_u_bias = g.grad_u_bias;
  auto ret = [&] {
    return std::make_tuple(grad_v, grad_u, grad_weight, grad_bias, grad_v_bias, grad_u_bias);
  };
  // Only outputs with elements are written; an empty sum is 0.
  const bool vu = (g.need_v || g.need_u) && H > 0;
  const bool wgrad = g.need_w && K > 0 && H > 0;
  const bool bgrad = g.need_b && K > 0;
  const bool vbgrad = g.need_vb && H > 0, ubgrad = g.need_ub && H > 0;
  if (M == 0) {
    if (wgrad) torch::stable::fill_(grad_weight, 0.0);
    if (bgrad) torch::stable::fill_(grad_bias, 0.0);
    if (vbgrad) torch::stable::fill_(grad_v_bias, 0.0);
    if (ubgrad) torch::stable::fill_(grad_u_bias, 0.0);
    return ret();
  }
  // Outputs that take a thread per column rather than only the bias lane
  const bool cols = vu || wgrad || vbgrad || ubgrad;
  if (!cols && !bgrad) return ret();
  const st::Device dev = v_pre.device();
  const cudaStream_t stream = st::current_stream(dev_index);
  const int64_t sms = st::sm_count(dev_index);
  const int kb = (wgrad || bgrad) ? kb_for(K) : 1;
  const int64_t passes = (wgrad || bgrad) ? ceil_div(K, kb) : 1;

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    dispatch_kb(kb, [&](auto kb_c) {
      constexpr int KB = decltype(kb_c)::value;
      // KB x VEC register sums per thread: 16-byte packs, narrower for the widest KB.
      constexpr int V = std::min(static_cast<int>(16 / sizeof(scalar_t)), 32 / KB);
      BackwardParams<scalar_t> P;
      P.grad = g.grad.const_data_ptr<acc_t>();
      P.v = in.v.data.const_data_ptr<scalar_t>();
      P.u = in.u.data.const_data_ptr<scalar_t>();
      P.w = in.weight.const_data_ptr<scalar_t>();
      P.vb = data_or_null<scalar_t>(in.v_bias);
      P.ub = data_or_null<scalar_t>(in.u_bias);
      P.rsv = in.v.rs;
      P.rsu = in.u.rs;
      P.M = M;
      P.H = H;
      P.K = K;
      scalar_t* gv = g.need_v && H > 0 ? grad_v.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gu = g.need_u && H > 0 ? grad_u.mutable_data_ptr<scalar_t>() : nullptr;
      const bool vec = rows_vectorisable(V, sizeof(scalar_t), H, in, {P.v, P.u, P.w, P.vb, P.ub, gv, gu});
      const int vec_n = vec ? V : 1;
      void (*kernel)(BackwardParams<scalar_t>) = nullptr;
      dispatch_act(in.act, [&](auto act_c) {
        constexpr int ACT = decltype(act_c)::value;
        kernel = vec ? gate_scores_backward_kernel<scalar_t, ACT, V, KB>
                     : gate_scores_backward_kernel<scalar_t, ACT, 1, KB>;
      });
      // Bias alone touches no column: one thread column, all 256 threads on rows.
      const int TX = cols ? row_threads(ceil_div(H, vec_n)) : 1;
      const int TY = kThreads / TX;
      const int64_t ctiles = cols ? ceil_div(ceil_div(H, vec_n), TX) : 1;
      // Equal slices, at least one full wave of blocks, and short running sums: a thread takes at
      // most kRowsPerThread rows of a slice (more slices instead), and at least 4.
      int per_sm = 0;
      const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
      MASKATTN_CHECK(err == cudaSuccess, op,
                     ": cudaOccupancyMaxActiveBlocksPerMultiprocessor failed: ", cudaGetErrorString(err));
      const int64_t wave = ceil_div(std::max<int64_t>(1, per_sm) * sms, ctiles);
      const int64_t most = ceil_div(M, 4LL * TY);
      int64_t slices = std::max(wave, ceil_div(M, static_cast<int64_t>(kRowsPerThread) * TY));
      slices = std::max<int64_t>(1, std::min(slices, most));
      P.rows = ceil_div(M, slices);
      slices = ceil_div(M, P.rows);
      P.ctiles = ctiles;
      P.wgrad = wgrad;
      P.bgrad = bgrad;
      P.boff = wgrad ? K * H : 0;
      P.vboff = P.boff + (bgrad ? K : 0);
      P.uboff = P.vboff + (vbgrad ? H : 0);
      P.nw = P.uboff + (ubgrad ? H : 0);
      st::Tensor part;
      if (P.nw > 0) part = st::empty({slices, P.nw}, st::acc_dtype(v_pre.scalar_type()), dev);
      P.part = P.nw > 0 ? part.mutable_data_ptr<acc_t>() : nullptr;
      const unsigned blocks = grid_x(slices * ctiles, op, "slices * column tiles");
      for (int64_t pass = 0; pass < passes; ++pass) {
        P.k0 = pass * KB;
        P.kc = static_cast<int>(std::min<int64_t>(KB, K - P.k0));
        P.gv = pass == 0 ? gv : nullptr;
        P.gu = pass == 0 ? gu : nullptr;
        P.vbgrad = pass == 0 && vbgrad;
        P.ubgrad = pass == 0 && ubgrad;
        kernel<<<blocks, dim3(TX, TY), 0, stream>>>(P);
        MASKATTN_CUDA_LAUNCH_CHECK();
      }
      if (P.nw > 0) {
        PartialOutputs<scalar_t> outs;
        outs.end[0] = P.boff;
        outs.end[1] = P.vboff;
        outs.end[2] = P.uboff;
        outs.end[3] = P.nw;
        outs.out[0] = wgrad ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
        outs.out[1] = bgrad ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
        outs.out[2] = vbgrad ? grad_v_bias.mutable_data_ptr<scalar_t>() : nullptr;
        outs.out[3] = ubgrad ? grad_u_bias.mutable_data_ptr<scalar_t>() : nullptr;
        combine_partials_kernel<scalar_t>
            <<<grid_x(ceil_div(P.nw, kCombineX), op, "ceil(partial width / 32)"), dim3(kCombineX, kCombineY),
               0, stream>>>(P.part, slices, P.nw, outs);
        MASKATTN_CUDA_LAUNCH_CHECK();
      }
    });
  };
  THO_DISPATCH_V2(v_pre.scalar_type(), "gated_attention_scores_backward_cuda",
                  AT_WRAP([&] { body(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return ret();
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("gated_attention_scores", TORCH_BOX(&maskattn::gated_attention_scores_cuda));
  m.impl("_gated_attention_scores_backward", TORCH_BOX(&maskattn::gated_attention_scores_backward_cuda));
}
