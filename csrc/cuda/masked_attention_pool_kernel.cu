// CUDA kernels of masked_attention_pool (padded and packed) and their backward.
//
// Forward: the features are read once. Each block takes a tile of D, a slice of one bag's rows
// and up to KB branches; it finds its slice's max logit, accumulates exp(l - max) * f and the sum
// of exp(l - max) (a split online softmax), and writes that partial state. A combine kernel
// rescales the partials to the bag's global max, and a last small kernel writes the weights.
// Splitting rows across blocks keeps the GPU full when B is 1 and N is 10^5.
//
// Packed offsets are read on the device and clamped into [0, T], never checked on the host:
// no synchronisation, and bad offsets cannot send a read or write out of bounds.
#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "masked_attention_pool.h"

namespace maskattn {
namespace {

using cuda::ceil_div;

constexpr int KBMAX = 4;   // branches accumulated by one block when K > 1
constexpr int UNROLL = 4;  // rows in flight per thread
constexpr int THREADS = 256;

// Where the rows of bag b live. Padded: rows [0, N) at b * stride_b. Packed: rows
// [offsets[b], offsets[b+1]) of one [T, ...] tensor, with absolute row indices.
struct BagGeom {
  const int64_t* offsets;  // null for padded
  int64_t N, T;            // padded length / packed total rows
  int64_t fs_b, fs_n;      // features (unit stride along D)
  int64_t ls_b, ls_n, ls_k;
  const bool* mask;  // null: all valid
  int64_t ms_b, ms_n;
  // int64: k * D and row * K index [B, K, D] / [rows, K] buffers that may exceed 2^31 elements.
  int64_t K, D;

  __device__ __forceinline__ void range(int64_t b, int64_t& r0, int64_t& r1) const {
    if (offsets == nullptr) {
      r0 = 0;
      r1 = N;
      return;
    }
    cuda::packed_bag_range(offsets, b, T, r0, r1);
  }
  // Row index into the contiguous [rows, K] weights / [rows, D] grad_features.
  __device__ __forceinline__ int64_t flat_row(int64_t b, int64_t r) const {
    return offsets == nullptr ? b * N + r : r;
  }
  __device__ __forceinline__ bool valid(int64_t b, int64_t r) const {
    return mask == nullptr || mask[b * ms_b + r * ms_n];
  }
};

// Chunks of `chunk` rows; split s of nsplit takes chunks s, s + nsplit, ... of its bag, so a packed
// bag longer than the host expected is still covered without knowing its length on the host.
// KB: branches per block (1 for the common single-branch case, so no FMA is spent on idle branches).
template <typename scalar_t, typename acc_t, int VEC, int KB>
__global__ void __launch_bounds__(THREADS)
    pool_partial_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ features, BagGeom g,
                        int64_t chunk, int nsplit, int64_t kgroups, int64_t dtiles,
                        acc_t* __restrict__ part_acc, acc_t* __restrict__ part_m, acc_t* __restrict__ part_s,
                        int64_t nbags) {
  __shared__ acc_t scratch[32];
  __shared__ acc_t s_max[KB];
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x * VEC]

  // blockIdx.x enumerates (bag, branch group, D tile) so that B may exceed the 65535 limit of y/z.
  const int s = blockIdx.y;
  const int64_t dtile = blockIdx.x % dtiles;
  const int64_t bkg = blockIdx.x / dtiles;
  const int64_t b = bkg / kgroups;
  const int64_t k0 = (bkg % kgroups) * KB;
  const int kc = static_cast<int>(min(static_cast<int64_t>(KB), g.K - k0));
  int64_t r0, r1;
  g.range(b, r0, r1);
  const int64_t nchunks = ceil_div(r1 - r0, chunk);
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y;
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* lb = logits + b * g.ls_b;
  const scalar_t* fb = features + b * g.fs_b;

  // 1) this split's max logit per branch, over valid rows
  for (int kk = 0; kk < kc; ++kk) {
    acc_t mx = NEG_INF;
    for (int64_t c = s; c < nchunks; c += nsplit) {
      const int64_t c0 = r0 + c * chunk, c1 = min(r1, c0 + chunk);
      for (int64_t r = c0 + tid; r < c1; r += nthreads) {
        if (g.valid(b, r)) {
          const acc_t v = static_cast<acc_t>(lb[r * g.ls_n + (k0 + kk) * g.ls_k]);
          mx = (v > mx || v != v) ? v : mx;  // NaN wins: an all-NaN bag is NaN, not empty
        }
      }
    }
    mx = cuda::block_reduce<acc_t, true>(mx, scratch);
    if (tid == 0) s_max[kk] = mx;
  }
  __syncthreads();

  // 2) sum of exp(l - max) * f over the rows, UNROLL rows in flight per thread. A thread's share
  //    of a long bag is thousands of rows: it sums kFold iterations in `acc`, then adds them to
  //    `acc_out` (cuda_utils.cuh), so the error does not grow with the bag's length.
  const int64_t d0 = (dtile * blockDim.x + threadIdx.x) * VEC;
  const bool active = d0 < g.D;
  acc_t acc[KB][VEC], acc_out[KB][VEC];
  acc_t esum[KB], esum_out[KB];
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    esum[kk] = 0;
    esum_out[kk] = 0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      acc[kk][v] = 0;
      acc_out[kk][v] = 0;
    }
  }
  int fold = 0;
  for (int64_t c = s; c < nchunks; c += nsplit) {
    const int64_t c0 = r0 + c * chunk, c1 = min(r1, c0 + chunk);
    for (int64_t rb = c0 + threadIdx.y; rb < c1; rb += static_cast<int64_t>(blockDim.y) * UNROLL) {
      acc_t e[UNROLL][KB];
      cuda::Pack<scalar_t, VEC> x[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t r = rb + static_cast<int64_t>(u) * blockDim.y;
        bool any = false;
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          e[u][kk] = 0;
          if (kk < kc && r < c1 && s_max[kk] != NEG_INF && g.valid(b, r)) {
            e[u][kk] =
                cuda::exp_diff<acc_t>(static_cast<acc_t>(lb[r * g.ls_n + (k0 + kk) * g.ls_k]), s_max[kk]);
            any = any || e[u][kk] != acc_t(0);
          }
        }
        // Padding rows are never loaded: their content, NaN included, cannot reach the sum.
        if (any && active) {
          x[u] = cuda::load_pack<scalar_t, VEC>(fb + r * g.fs_n + d0);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) x[u].v[v] = scalar_t(0);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          // A row is loaded when any branch weighs it; a branch whose weight is 0 selects it away
          // rather than multiplying (0 * NaN), so each branch skips its own zero-weight rows.
          const bool live = e[u][kk] != acc_t(0);
          esum[kk] += e[u][kk];
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            acc[kk][v] += live ? e[u][kk] * static_cast<acc_t>(x[u].v[v]) : acc_t(0);
        }
      }
      if (++fold == cuda::kFold) {
        fold = 0;
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
          esum_out[kk] += esum[kk];
          esum[kk] = 0;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            acc_out[kk][v] += acc[kk][v];
            acc[kk][v] = 0;
          }
        }
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    esum[kk] += esum_out[kk];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[kk][v] += acc_out[kk][v];
  }

  // 3) reduce over threadIdx.y and write this split's partial state
  const int64_t part_row = (static_cast<int64_t>(s) * nbags + b) * g.K;
  const int width = blockDim.x * VEC;
  for (int kk = 0; kk < kc; ++kk) {
    const acc_t es = cuda::block_reduce<acc_t, false>(threadIdx.x == 0 ? esum[kk] : acc_t(0), scratch);
    __syncthreads();
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[threadIdx.y * width + threadIdx.x * VEC + v] = acc[kk][v];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t t = 0;
        for (int y = 0; y < static_cast<int>(blockDim.y); ++y) t += red[y * width + threadIdx.x * VEC + v];
        if (d0 + v < g.D) part_acc[(part_row + k0 + kk) * g.D + d0 + v] = t;
      }
    }
    if (dtile == 0 && tid == 0) {
      part_m[part_row + k0 + kk] = s_max[kk];
      part_s[part_row + k0 + kk] = es;
    }
  }
}

// pooled[b,k,:] = sum_s acc_s * exp(m_s - M) / S with M = max_s m_s, S = sum_s s_s * exp(m_s - M).
// A block takes 32 consecutive d of one (b, k) and spreads the splits over its 8 thread rows, so a
// long bag split 500 ways is combined in parallel rather than by one serial loop per thread.
constexpr int COMBINE_X = 32, COMBINE_Y = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(COMBINE_X* COMBINE_Y)
    pool_combine_kernel(const acc_t* __restrict__ part_acc, const acc_t* __restrict__ part_m,
                        const acc_t* __restrict__ part_s, int nsplit, int64_t nbk, int64_t D, int64_t dblocks,
                        scalar_t* __restrict__ pooled, acc_t* __restrict__ stats) {
  __shared__ acc_t scratch[32];
  __shared__ acc_t red[COMBINE_Y][COMBINE_X + 1];
  const int64_t bk = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  const int tid = threadIdx.x + threadIdx.y * COMBINE_X;
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  acc_t M = NEG_INF;
  for (int s = tid; s < nsplit; s += COMBINE_X * COMBINE_Y) {
    const acc_t m = part_m[s * nbk + bk];
    M = (m > M || m != m) ? m : M;  // a NaN split max poisons the bag
  }
  M = cuda::block_reduce<acc_t, true>(M, scratch);
  acc_t S = 0;
  if (M != NEG_INF) {
    for (int s = tid; s < nsplit; s += COMBINE_X * COMBINE_Y) {
      const acc_t m = part_m[s * nbk + bk];
      if (m != NEG_INF) S += part_s[s * nbk + bk] * cuda::exp_diff<acc_t>(m, M);
    }
  }
  S = cuda::block_reduce<acc_t, false>(S, scratch);
  // No valid row (or only -inf logits): zeros, not 0/0. A NaN logit makes S NaN and poisons the bag.
  const bool empty = M == NEG_INF || S == acc_t(0);
  const acc_t inv = empty ? acc_t(0) : acc_t(1) / S;
  if (db == 0 && tid == 0) {
    stats[2 * bk] = M;
    stats[2 * bk + 1] = inv;
  }
  const int64_t d = db * COMBINE_X + threadIdx.x;
  acc_t t = 0, t_out = 0;
  if (!empty && d < D) {
    int fold = 0;
    for (int s = threadIdx.y; s < nsplit; s += COMBINE_Y) {
      const acc_t m = part_m[s * nbk + bk];
      // a split whose scale underflows to 0 is skipped, not multiplied (0 * inf)
      const acc_t sc = m != NEG_INF ? cuda::exp_diff<acc_t>(m, M) : acc_t(0);
      if (sc != acc_t(0)) t += part_acc[(s * nbk + bk) * D + d] * sc;
      if (++fold == cuda::kFold) {
        fold = 0;
        t_out += t;
        t = 0;
      }
    }
  }
  t += t_out;
  red[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    acc_t sum = 0;
#pragma unroll
    for (int y = 0; y < COMBINE_Y; ++y) sum += red[y][threadIdx.x];
    pooled[bk * D + d] = static_cast<scalar_t>(sum * inv);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pool_weights_kernel(const scalar_t* __restrict__ logits, BagGeom g,
                                    const acc_t* __restrict__ stats, int64_t xblocks,
                                    scalar_t* __restrict__ weights) {
  const int64_t b = blockIdx.x / xblocks, xb = blockIdx.x % xblocks;
  int64_t r0, r1;
  g.range(b, r0, r1);
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* lb = logits + b * g.ls_b;
  for (int64_t r = r0 + xb * blockDim.x + threadIdx.x; r < r1; r += xblocks * blockDim.x) {
    const bool valid = g.valid(b, r);
    for (int64_t k = 0; k < g.K; ++k) {
      const acc_t M = stats[2 * (b * g.K + k)], inv = stats[2 * (b * g.K + k) + 1];
      acc_t w = 0;
      if (valid && M != NEG_INF)
        w = cuda::exp_diff<acc_t>(static_cast<acc_t>(lb[r * g.ls_n + k * g.ls_k]), M) * inv;
      weights[g.flat_row(b, r) * g.K + k] = static_cast<scalar_t>(w);
    }
  }
}

// ------------------------------------------------------------------------------------------ backward

// One warp per row: gsum[row,k] = <grad_pooled[b,k,:], f[row,:]> (rows with weight 0 give 0), and
// grad_features[row,:] = sum_k w[row,k] grad_pooled[b,k,:]. The row's bag comes from the flat row.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS)
    pool_backward_rows_kernel(const scalar_t* __restrict__ features, BagGeom g, int64_t nbags,
                              int64_t rows_total, const scalar_t* __restrict__ weights,
                              const acc_t* __restrict__ grad_pooled, acc_t* __restrict__ gsum,
                              scalar_t* __restrict__ grad_features) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       row < rows_total; row += warps) {
    int64_t b, r;
    if (g.offsets == nullptr) {
      b = row / g.N;
      r = row - b * g.N;
    } else {
      // last bag whose start is <= row (offsets clamped, so any input stays in range)
      int64_t lo = 0, hi = nbags - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) >> 1;
        if (cuda::clamp_offset(g.offsets[mid], g.T) <= row)
          lo = mid;
        else
          hi = mid - 1;
      }
      b = lo;
      r = row;
    }
    const scalar_t* f = features + b * g.fs_b + r * g.fs_n;
    const acc_t* gp = grad_pooled + b * g.K * g.D;
    const scalar_t* w = weights + row * g.K;
    if (gsum != nullptr) {
      for (int64_t k = 0; k < g.K; ++k) {
        const bool live = static_cast<acc_t>(w[k]) != acc_t(0);
        acc_t t = 0;
        if (live) {
          for (int64_t d = static_cast<int64_t>(lane) * VEC; d < g.D; d += 32 * VEC) {
            const auto x = cuda::load_pack<scalar_t, VEC>(f + d);
#pragma unroll
            for (int v = 0; v < VEC; ++v) t += static_cast<acc_t>(x.v[v]) * gp[k * g.D + d + v];
          }
        }
        t = cuda::warp_sum(t);
        if (lane == 0) gsum[row * g.K + k] = t;
      }
    }
    if (grad_features != nullptr) {
      scalar_t* out = grad_features + row * g.D;
      for (int64_t d = static_cast<int64_t>(lane) * VEC; d < g.D; d += 32 * VEC) {
        cuda::Pack<scalar_t, VEC> y;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          // zero-weight branches (all of them for padding) are selected away, not multiplied:
          // grad_pooled may hold inf/NaN, and 0 * inf must not reach the row's gradient
          acc_t t = 0;
          for (int k = 0; k < g.K; ++k) {
            const acc_t wk = static_cast<acc_t>(w[k]);
            t += wk != acc_t(0) ? wk * gp[k * g.D + d + v] : acc_t(0);
          }
          y.v[v] = static_cast<scalar_t>(t);
        }
        cuda::store_pack<scalar_t, VEC>(out + d, y);
      }
    }
  }
}

// Softmax backward per (bag, branch): dl = w * (g - sum(w * g)), g = gsum + grad_weights.
template <typename scalar_t, typename acc_t>
__global__ void pool_backward_softmax_kernel(BagGeom g, const scalar_t* __restrict__ weights,
                                             const acc_t* __restrict__ gsum,
                                             const scalar_t* __restrict__ grad_weights,
                                             scalar_t* __restrict__ grad_logits) {
  __shared__ acc_t scratch[32];
  const int64_t b = blockIdx.x / g.K;
  const int64_t k = blockIdx.x % g.K;
  int64_t r0, r1;
  g.range(b, r0, r1);
  acc_t c = 0, c_out = 0;
  int fold = 0;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const int64_t i = g.flat_row(b, r) * g.K + k;
    const acc_t w = static_cast<acc_t>(weights[i]);
    if (w != acc_t(0)) c += w * (gsum[i] + (grad_weights ? static_cast<acc_t>(grad_weights[i]) : acc_t(0)));
    if (++fold == cuda::kFold) {
      fold = 0;
      c_out += c;
      c = 0;
    }
  }
  c = cuda::block_reduce<acc_t, false>(c + c_out, scratch);
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const int64_t i = g.flat_row(b, r) * g.K + k;
    const acc_t w = static_cast<acc_t>(weights[i]);
    acc_t out = 0;
    if (w != acc_t(0))
      out = w * (gsum[i] + (grad_weights ? static_cast<acc_t>(grad_weights[i]) : acc_t(0)) - c);
    grad_logits[i] = static_cast<scalar_t>(out);
  }
}

// ------------------------------------------------------------------------------------------ host side

template <typename scalar_t>
int pick_vec(const st::Tensor& f, int64_t D, int64_t fs_b, int64_t fs_n) {
  constexpr int V = 16 / sizeof(scalar_t);
  const bool ok = V > 1 && D % V == 0 && fs_n % V == 0 && fs_b % V == 0 &&
                  reinterpret_cast<uintptr_t>(f.data_ptr()) % 16 == 0;
  return ok ? V : 1;
}

// Views the inputs as BagGeom. `features` must have unit stride along D.
BagGeom make_geom(const st::Tensor& logits, const st::Tensor& features, const st::Tensor& mask,
                  const st::Tensor& offsets) {
  BagGeom g{};
  const bool packed = offsets.defined();
  g.offsets = packed ? offsets.const_data_ptr<int64_t>() : nullptr;
  g.K = logits.size(-1);
  g.D = features.size(-1);
  if (packed) {
    g.T = features.size(0);
    g.N = 0;
    g.fs_b = 0;
    g.fs_n = features.stride(0);
    g.ls_b = 0;
    g.ls_n = logits.stride(0);
  } else {
    g.N = features.size(1);
    g.T = 0;
    g.fs_b = features.stride(0);
    g.fs_n = features.stride(1);
    g.ls_b = logits.stride(0);
    g.ls_n = logits.stride(1);
  }
  g.ls_k = logits.stride(-1);
  g.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  g.ms_b = mask.defined() ? mask.stride(0) : 0;
  g.ms_n = mask.defined() ? mask.stride(1) : 0;
  return g;
}

st::Tensor unit_stride_d(const st::Tensor& f) {
  return f.stride(-1) == 1 ? f : torch::stable::contiguous(f);
}

// rows_hint: rows per bag the host expects (N padded, T/B packed) to size the split.
template <typename scalar_t, typename acc_t, int VEC, int KB>
void launch_partial(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const scalar_t* lp,
                    const scalar_t* fp, const BagGeom& g, int64_t chunk, int nsplit, int64_t kgroups,
                    int64_t dtiles, acc_t* pa, acc_t* pm, acc_t* ps, int64_t nbags) {
  pool_partial_kernel<scalar_t, acc_t, VEC, KB>
      <<<grid, block, smem, stream>>>(lp, fp, g, chunk, nsplit, kgroups, dtiles, pa, pm, ps, nbags);
  MASKATTN_CUDA_LAUNCH_CHECK();
}

// rows_hint: rows per bag the host expects (N padded, T/B packed) to size the split. With squeeze_k
// (K == 1) the outputs are allocated without their K dim ([B, D], [rows]): the same memory, and an
// op output that is a view cannot be modified in place under autograd (pooled += bias), so every
// output is a tensor of its own.
std::tuple<st::Tensor, st::Tensor> pool_forward_cuda(const st::Tensor& logits, const st::Tensor& features,
                                                     const st::Tensor& mask, const st::Tensor& offsets,
                                                     int64_t nbags, int64_t rows_hint, bool squeeze_k) {
  const int32_t dev_index = features.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const bool packed = offsets.defined();
  const int64_t K = logits.size(-1), D = features.size(-1);
  const st::Device dev = features.device();
  const st::ScalarType lt = logits.scalar_type(), ft = features.scalar_type();
  st::View ws = st::View::of(logits);
  if (squeeze_k) ws = ws.drop(ws.ndim - 1);
  // Packed rows outside every (clamped) bag must still read as weight 0: zero-fill.
  st::Tensor weights = packed ? st::zeros(ws.size, ws.ndim, lt, dev) : st::empty(ws.size, ws.ndim, lt, dev);
  st::Tensor pooled = squeeze_k ? st::empty({nbags, D}, ft, dev) : st::empty({nbags, K, D}, ft, dev);
  if (nbags == 0 || K == 0) return {pooled, weights};
  if (logits.numel() == 0) {  // no rows at all: empty bags pool to zeros
    torch::stable::fill_(pooled, 0.0);
    return {pooled, weights};
  }
  const BagGeom g = make_geom(logits, features, mask, offsets);
  const cudaStream_t stream = st::current_stream(dev_index);
  const int sms = st::sm_count(dev_index);
  const st::ScalarType acc_type = st::acc_dtype(ft);

  // A generic lambda outside the dispatch macro: the commas of <<<...>>> would split its arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t) > 1 ? 16 / sizeof(scalar_t) : 1;
    const int vec = pick_vec<scalar_t>(features, D, g.fs_b, g.fs_n);
    const int64_t lanes = std::max<int64_t>(1, ceil_div(D, vec));  // D == 0 still computes the weights
    const int tx = static_cast<int>(std::min<int64_t>(128, ceil_div(lanes, 32) * 32));
    const int ty = THREADS / tx;
    const int64_t dtiles = ceil_div(lanes, tx);
    const int kb = K == 1 ? 1 : KBMAX;
    // int64: for K past 2^33 the group count must reach the grid check below, not wrap first
    const int64_t kgroups = ceil_div(K, kb);
    const int64_t xblocks = dtiles * nbags * kgroups;
    MASKATTN_CHECK(xblocks <= INT32_MAX, "masked_attention_pool: B * ceil(K/4) * D-tiles = ", xblocks,
                   " exceeds the CUDA grid limit");
    const int64_t min_rows = static_cast<int64_t>(ty) * UNROLL * 4;
    int64_t nsplit = std::max<int64_t>(1, ceil_div(4LL * sms, xblocks));
    nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, ceil_div(rows_hint, min_rows)));
    nsplit = std::min<int64_t>(nsplit, 65535);
    const int64_t chunk = std::max<int64_t>(1, ceil_div(std::max<int64_t>(rows_hint, 1), nsplit));

    st::Tensor part_acc = st::empty({nsplit, nbags, K, D}, acc_type, dev);
    st::Tensor part_ms = st::empty({2, nsplit, nbags, K}, acc_type, dev);
    st::Tensor stats = st::empty({nbags, K, 2}, acc_type, dev);
    acc_t* pa = part_acc.mutable_data_ptr<acc_t>();
    acc_t* pm = part_ms.mutable_data_ptr<acc_t>();
    acc_t* ps = pm + nsplit * nbags * K;

    const dim3 block(tx, ty);
    const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(nsplit));
    const size_t smem = static_cast<size_t>(THREADS) * vec * sizeof(acc_t);
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const scalar_t* fp = features.const_data_ptr<scalar_t>();
    const int ns = static_cast<int>(nsplit);
    if (vec > 1 && kb == 1) {
      launch_partial<scalar_t, acc_t, V, 1>(grid, block, smem, stream, lp, fp, g, chunk, ns, kgroups, dtiles,
                                            pa, pm, ps, nbags);
    } else if (vec > 1) {
      launch_partial<scalar_t, acc_t, V, KBMAX>(grid, block, smem, stream, lp, fp, g, chunk, ns, kgroups,
                                                dtiles, pa, pm, ps, nbags);
    } else if (kb == 1) {
      launch_partial<scalar_t, acc_t, 1, 1>(grid, block, smem, stream, lp, fp, g, chunk, ns, kgroups, dtiles,
                                            pa, pm, ps, nbags);
    } else {
      launch_partial<scalar_t, acc_t, 1, KBMAX>(grid, block, smem, stream, lp, fp, g, chunk, ns, kgroups,
                                                dtiles, pa, pm, ps, nbags);
    }

    const int64_t dblocks = std::max<int64_t>(1, ceil_div(D, COMBINE_X));
    MASKATTN_CHECK(nbags * K * dblocks <= INT32_MAX,
                   "masked_attention_pool: B * K * ceil(D/32) = ", nbags * K * dblocks,
                   " exceeds the CUDA grid limit");
    pool_combine_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(nbags * K * dblocks), dim3(COMBINE_X, COMBINE_Y), 0, stream>>>(
            pa, pm, ps, ns, nbags * K, D, dblocks, pooled.mutable_data_ptr<scalar_t>(),
            stats.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();

    const int64_t wx =
        std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows_hint, 256), ceil_div(4LL * sms, nbags)));
    MASKATTN_CHECK(nbags * wx <= INT32_MAX, "masked_attention_pool: B = ", nbags,
                   " exceeds the CUDA grid limit");
    pool_weights_kernel<scalar_t, acc_t><<<static_cast<unsigned>(nbags * wx), 256, 0, stream>>>(
        lp, g, stats.const_data_ptr<acc_t>(), wx, weights.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
  };
  THO_DISPATCH_V2(ft, "masked_attention_pool_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {pooled, weights};
}

std::tuple<st::Tensor, st::Tensor> pool_backward_cuda(const PoolGrads& pg, const st::Tensor& features_in,
                                                      const st::Tensor& offsets, int64_t nbags,
                                                      bool need_logits, bool need_features) {
  const int32_t dev_index = features_in.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const st::Tensor features = unit_stride_d(features_in);
  const st::Tensor weights = pg.weights.is_contiguous() ? pg.weights : torch::stable::contiguous(pg.weights);
  const int64_t K = weights.size(-1), D = features.size(-1);
  const int64_t rows_total = offsets.defined() ? features.size(0) : features.size(0) * features.size(1);
  const st::Device dev = features.device();
  const st::ScalarType wt = weights.scalar_type(), ft = features.scalar_type();
  // grad_logits has the weights' shape as passed (without the K dim when they had none).
  st::View ws = st::View::of(weights);
  if (pg.squeeze_k) ws = ws.drop(ws.ndim - 1);
  const st::View fs = st::View::of(features);
  st::Tensor grad_logits = need_logits ? st::empty(ws.size, ws.ndim, wt, dev) : st::empty({0}, wt, dev);
  st::Tensor grad_features = need_features ? st::empty(fs.size, fs.ndim, ft, dev) : st::empty({0}, ft, dev);
  if ((!need_logits && !need_features) || rows_total == 0) return {grad_logits, grad_features};
  // With D == 0 there are no features, but the logits still get the weights' own gradient:
  // only the rows kernel (which would add <grad_pooled, row> = 0) is skipped.
  if (K == 0 || nbags == 0) {
    if (need_logits) torch::stable::fill_(grad_logits, 0.0);
    if (need_features) torch::stable::fill_(grad_features, 0.0);
    return {grad_logits, grad_features};
  }
  const st::ScalarType acc_type = st::acc_dtype(ft);
  const st::Tensor gp = acc_contiguous(pg.grad_pooled, acc_type);
  const st::Tensor gw = !pg.grad_weights.defined()        ? st::Tensor()
                        : pg.grad_weights.is_contiguous() ? pg.grad_weights
                                                          : torch::stable::contiguous(pg.grad_weights);
  const BagGeom g = make_geom(weights, features, st::Tensor(), offsets);
  const cudaStream_t stream = st::current_stream(dev_index);
  const int sms = st::sm_count(dev_index);
  st::Tensor gsum = need_logits ? st::zeros({rows_total, K}, acc_type, dev) : st::Tensor();

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const int vec = pick_vec<scalar_t>(features, D, g.fs_b, g.fs_n);
    const int64_t blocks = std::min<int64_t>(ceil_div(rows_total, THREADS / 32), 32LL * sms);
    acc_t* gs = need_logits ? gsum.mutable_data_ptr<acc_t>() : nullptr;
    scalar_t* gf = need_features ? grad_features.mutable_data_ptr<scalar_t>() : nullptr;
    if (D == 0) {
      // gsum stays 0; grad_features is empty
    } else if (vec > 1) {
      constexpr int V = 16 / sizeof(scalar_t) > 1 ? 16 / sizeof(scalar_t) : 1;
      pool_backward_rows_kernel<scalar_t, acc_t, V><<<blocks, THREADS, 0, stream>>>(
          features.const_data_ptr<scalar_t>(), g, nbags, rows_total, weights.const_data_ptr<scalar_t>(),
          gp.const_data_ptr<acc_t>(), gs, gf);
      MASKATTN_CUDA_LAUNCH_CHECK();
    } else {
      pool_backward_rows_kernel<scalar_t, acc_t, 1><<<blocks, THREADS, 0, stream>>>(
          features.const_data_ptr<scalar_t>(), g, nbags, rows_total, weights.const_data_ptr<scalar_t>(),
          gp.const_data_ptr<acc_t>(), gs, gf);
      MASKATTN_CUDA_LAUNCH_CHECK();
    }
    if (need_logits) {
      // Rows no bag covers (only with bad packed offsets) keep a zero gradient.
      if (offsets.defined()) torch::stable::fill_(grad_logits, 0.0);
      MASKATTN_CHECK(nbags * K <= INT32_MAX, "masked_attention_pool backward: B * K = ", nbags * K,
                     " exceeds the CUDA grid limit");
      pool_backward_softmax_kernel<scalar_t, acc_t><<<static_cast<unsigned>(nbags * K), 256, 0, stream>>>(
          g, weights.const_data_ptr<scalar_t>(), gs, gw.defined() ? gw.const_data_ptr<scalar_t>() : nullptr,
          grad_logits.mutable_data_ptr<scalar_t>());
      MASKATTN_CUDA_LAUNCH_CHECK();
    }
  };
  THO_DISPATCH_V2(ft, "masked_attention_pool_backward_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {grad_logits, grad_features};
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_cuda(const st::Tensor& logits,
                                                              const st::Tensor& features,
                                                              const std::optional<st::Tensor>& mask) {
  PoolInputs in = check_pool_inputs(logits, features, mask);
  const st::Tensor f = unit_stride_d(in.features);
  return pool_forward_cuda(in.logits, f, in.mask, st::Tensor(), f.size(0), f.size(1), in.squeeze_k);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_backward_cuda(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& weights,
    const st::Tensor& features, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  PoolGrads g = check_pool_grads(grad_pooled, grad_weights, weights, features, std::nullopt);
  return pool_backward_cuda(g, features, st::Tensor(), features.size(0), output_mask[0], output_mask[1]);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_packed_cuda(const st::Tensor& logits,
                                                                     const st::Tensor& features,
                                                                     const st::Tensor& offsets) {
  PackedInputs in = check_packed_inputs(logits, features, offsets);
  const st::Tensor f = unit_stride_d(in.features);
  const int64_t nbags = in.offsets.size(0) - 1;
  return pool_forward_cuda(in.logits, f, st::Tensor(), in.offsets, nbags,
                           nbags > 0 ? ceil_div(f.size(0), nbags) : 0, in.squeeze_k);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_packed_backward_cuda(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& weights,
    const st::Tensor& features, const st::Tensor& offsets, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  PoolGrads g = check_pool_grads(grad_pooled, grad_weights, weights, features, offsets);
  return pool_backward_cuda(g, features, g.offsets, g.offsets.size(0) - 1, output_mask[0], output_mask[1]);
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("masked_attention_pool", TORCH_BOX(&maskattn::masked_attention_pool_cuda));
  m.impl("_masked_attention_pool_backward", TORCH_BOX(&maskattn::masked_attention_pool_backward_cuda));
  m.impl("masked_attention_pool_packed", TORCH_BOX(&maskattn::masked_attention_pool_packed_cuda));
  m.impl("_masked_attention_pool_packed_backward",
         TORCH_BOX(&maskattn::masked_attention_pool_packed_backward_cuda));
}
