// CUDA kernels of masked_channel_attention_pool (padded and packed) and their backward.
//
// PyG's feature-level gate: channel d of bag b has a softmax of its own over the bag's valid rows,
// w[n, d] = softmax_n(l[n, d]), pooled[b, d] = sum_n w[n, d] f[n, d].
//
// Forward: a block takes a tile of channels (VEC per thread, one aligned load per row) and a slice
// of one bag's rows. Each thread keeps an online softmax state per channel - max m, sum of
// e^(l - m), sum of e^(l - m) f - and rescales it when a larger logit arrives, so logits and
// features are read once, with one exp per element. The block's thread rows merge their states
// (log-sum-exp), a combine kernel merges a bag's slices into pooled and each channel's max and
// 1 / sum, and a last kernel writes the weights. Splitting rows across blocks keeps the GPU full
// when B is 1 and N is 10^5; every merge runs in a fixed order, so results do not depend on timing.
//
// A slice decides "weight 0" against its own max: a row whose weight underflows only against the
// bag's max may carry a non-finite feature into a channel that is otherwise finite. Such a channel
// (pooled non-finite while its max and sum are finite) is summed again from its final weights,
// reading only rows of weight > 0, as the CPU kernel does; finite inputs never take that path.
//
// Packed offsets are read on the device and clamped into [0, T], never checked on the host: no
// synchronisation, and bad offsets cannot send a read or write out of bounds.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "masked_channel_attention_pool.h"

namespace maskattn {
namespace {

using cuda::ceil_div;

constexpr int THREADS = 256;
constexpr int UNROLL = 4;  // rows in flight per thread
// Combine and re-sum blocks: 32 consecutive channels x 8 lanes over the splits (or rows).
constexpr int TILE_X = 32, TILE_Y = 8;

// Where bag b's rows live. Padded: rows [0, N) of bag b. Packed: rows [offsets[b], offsets[b+1])
// of one [T, D] tensor, as absolute row indices, the offsets clamped into [0, T].
struct Bags {
  const int64_t* offsets;  // null: padded
  int64_t N, T, D;
  const bool* mask;  // null: all valid
  int64_t ms_b, ms_n;

  __device__ __forceinline__ void range(int64_t b, int64_t& r0, int64_t& r1) const {
    if (offsets == nullptr) {
      r0 = 0;
      r1 = N;
      return;
    }
    cuda::packed_bag_range(offsets, b, T, r0, r1);
  }
  __device__ __forceinline__ bool valid(int64_t b, int64_t r) const {
    return mask == nullptr || mask[b * ms_b + r * ms_n];
  }
};

// A [B, N, D] or [T, D] operand with unit stride along D (packed: s_b = 0, absolute rows).
template <typename T>
struct Rows {
  T* p;
  int64_t s_b, s_n;
  __device__ __forceinline__ T* at(int64_t b, int64_t r, int64_t d) const {
    return p + b * s_b + r * s_n + d;
  }
};

// ---- online softmax states (m, s, a): max, sum of e^(l - m), sum of e^(l - m) f ----

// A scale that underflows to 0 selects the term away rather than multiplying it: 0 * inf must not
// turn a row that weighs nothing into NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t scaled(acc_t x, acc_t c) {
  return c != acc_t(0) ? x * c : acc_t(0);
}

// (m, s, a) <- (m, s, a) merged with (m2, s2, a2). A NaN max wins and poisons the sums; a state
// with max -inf (no row, or only -inf logits) contributes nothing.
template <typename acc_t>
__device__ __forceinline__ void merge_state(acc_t& m, acc_t& s, acc_t& a, acc_t m2, acc_t s2, acc_t a2) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const acc_t M = (m2 > m || m2 != m2) ? m2 : m;
  const acc_t c1 = m == NEG_INF ? acc_t(0) : cuda::exp_diff<acc_t>(m, M);
  const acc_t c2 = m2 == NEG_INF ? acc_t(0) : cuda::exp_diff<acc_t>(m2, M);
  s = scaled(s, c1) + scaled(s2, c2);
  a = scaled(a, c1) + scaled(a2, c2);
  m = M;
}

// Chunks of `chunk` rows; split s of gridDim.y takes chunks s, s + gridDim.y, ... of its bag, so a
// packed bag longer than the host expected is still covered without its length on the host.
// part: [3][nsplit][B][D] (max, sum, acc) of each split.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS, 2)
    channel_partial_kernel(Rows<const scalar_t> logits, Rows<const scalar_t> features, Bags g, int64_t chunk,
                           int64_t dtiles, int64_t nbags, acc_t* __restrict__ part) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);  // [3][blockDim.y][blockDim.x * VEC]
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int s = blockIdx.y, nsplit = gridDim.y;
  const int64_t dtile = blockIdx.x % dtiles, b = blockIdx.x / dtiles;
  int64_t r0, r1;
  g.range(b, r0, r1);
  const int64_t nchunks = ceil_div(r1 - r0, chunk);
  const int64_t d0 = (dtile * blockDim.x + threadIdx.x) * VEC;
  const bool active = d0 < g.D;
  // Rows in flight per thread: fewer for 8-wide packs, whose state already takes 40 registers.
  constexpr int kUnroll = VEC >= 8 ? 2 : UNROLL;

  // A thread's share of a long bag is thousands of rows: the sums take kFold iterations in the
  // inner registers, then go to the outer ones (cuda_utils.cuh), so the error does not grow with N.
  acc_t m[VEC], s_in[VEC], s_out[VEC], a_in[VEC], a_out[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    m[v] = NEG_INF;
    s_in[v] = s_out[v] = a_in[v] = a_out[v] = acc_t(0);
  }
  if (active) {
    int fold = 0;
    for (int64_t c = s; c < nchunks; c += nsplit) {
      const int64_t c0 = r0 + c * chunk, c1 = min(r1, c0 + chunk);
      for (int64_t rb = c0 + threadIdx.y; rb < c1; rb += static_cast<int64_t>(blockDim.y) * kUnroll) {
        cuda::Pack<scalar_t, VEC> lx[kUnroll], fx[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = rb + static_cast<int64_t>(u) * blockDim.y;
          ok[u] = r < c1 && g.valid(b, r);
          // Padding rows are never loaded: their content, NaN included, cannot reach a sum.
          if (ok[u]) {
            lx[u] = cuda::load_pack<scalar_t, VEC>(logits.at(b, r, d0));
            fx[u] = cuda::load_pack<scalar_t, VEC>(features.at(b, r, d0));
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const acc_t l = static_cast<acc_t>(lx[u].v[v]);
            if (l > m[v] || l != l) {  // a new max (a NaN logit wins and stays)
              const acc_t c = m[v] == NEG_INF ? acc_t(0) : cuda::exp_diff<acc_t>(m[v], l);
              s_in[v] = scaled(s_in[v], c);
              s_out[v] = scaled(s_out[v], c);
              a_in[v] = scaled(a_in[v], c);
              a_out[v] = scaled(a_out[v], c);
              m[v] = l;
            }
            const acc_t e = m[v] == NEG_INF ? acc_t(0) : cuda::exp_diff<acc_t>(l, m[v]);
            s_in[v] += e;
            // an entry of weight 0 is selected away, not multiplied: its feature may be inf/NaN
            a_in[v] += e != acc_t(0) ? e * static_cast<acc_t>(fx[u].v[v]) : acc_t(0);
          }
        }
        if (++fold == cuda::kFold) {
          fold = 0;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            s_out[v] += s_in[v];
            a_out[v] += a_in[v];
            s_in[v] = a_in[v] = acc_t(0);
          }
        }
      }
    }
  }

  // merge the thread rows' states, in order of threadIdx.y, and write this split's state
  const int width = blockDim.x * VEC, plane = blockDim.y * width;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int i = threadIdx.y * width + threadIdx.x * VEC + v;
    red[i] = m[v];
    red[plane + i] = s_in[v] + s_out[v];
    red[2 * plane + i] = a_in[v] + a_out[v];
  }
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  const int64_t split_plane = static_cast<int64_t>(nsplit) * nbags * g.D;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int i = threadIdx.x * VEC + v;
    acc_t M = red[i], S = red[plane + i], A = red[2 * plane + i];
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y)
      merge_state(M, S, A, red[y * width + i], red[plane + y * width + i], red[2 * plane + y * width + i]);
    if (d0 + v < g.D) {
      const int64_t o = (static_cast<int64_t>(s) * nbags + b) * g.D + d0 + v;
      part[o] = M;
      part[split_plane + o] = S;
      part[2 * split_plane + o] = A;
    }
  }
}

// Per (bag, channel): the splits' states merged (TILE_Y lanes over the splits, then in lane
// order); pooled = A / S; stats [3][B][D] get the max, 1 / S and whether the channel must be
// summed again (pooled non-finite while max and sum are finite: see the top of the file).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(TILE_X* TILE_Y)
    channel_combine_kernel(const acc_t* __restrict__ part, int nsplit, int64_t nbags, int64_t D,
                           int64_t dblocks, scalar_t* __restrict__ pooled, acc_t* __restrict__ stats) {
  __shared__ acc_t red[3][TILE_Y][TILE_X + 1];
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t b = blockIdx.x / dblocks, d = (blockIdx.x % dblocks) * TILE_X + threadIdx.x;
  const int64_t plane = static_cast<int64_t>(nsplit) * nbags * D;
  acc_t M = NEG_INF, S = 0, A = 0;
  if (d < D) {
    for (int s = threadIdx.y; s < nsplit; s += TILE_Y) {
      const int64_t o = (static_cast<int64_t>(s) * nbags + b) * D + d;
      merge_state(M, S, A, part[o], part[plane + o], part[2 * plane + o]);
    }
  }
  red[0][threadIdx.y][threadIdx.x] = M;
  red[1][threadIdx.y][threadIdx.x] = S;
  red[2][threadIdx.y][threadIdx.x] = A;
  __syncthreads();
  if (threadIdx.y != 0 || d >= D) return;
  for (int y = 1; y < TILE_Y; ++y)
    merge_state(M, S, A, red[0][y][threadIdx.x], red[1][y][threadIdx.x], red[2][y][threadIdx.x]);
  // No valid row (or only -inf logits): zeros, not 0/0. A NaN or +inf logit makes S NaN.
  const bool empty = M == NEG_INF || S == acc_t(0);
  const acc_t inv = empty ? acc_t(0) : acc_t(1) / S;
  const acc_t p = empty ? acc_t(0) : A * inv;
  const bool redo = !empty && isfinite(M) && isfinite(S) && !isfinite(p);
  const int64_t o = b * D + d, bd = nbags * D;
  pooled[o] = static_cast<scalar_t>(p);
  stats[o] = M;
  stats[bd + o] = inv;
  stats[2 * bd + o] = redo ? acc_t(1) : acc_t(0);
}

// The channels flagged by the combine: pooled = sum of w f over the rows with w > 0 only, w from
// the final max and sum. TILE_Y lanes over the rows, folded sums, then lane order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(TILE_X* TILE_Y)
    channel_resum_kernel(Rows<const scalar_t> logits, Rows<const scalar_t> features, Bags g, int64_t nbags,
                         int64_t dblocks, const acc_t* __restrict__ stats, scalar_t* __restrict__ pooled) {
  __shared__ acc_t red[TILE_Y][TILE_X + 1];
  const int64_t b = blockIdx.x / dblocks, d = (blockIdx.x % dblocks) * TILE_X + threadIdx.x;
  const int64_t o = b * g.D + d, bd = nbags * g.D;
  const bool redo = d < g.D && stats[2 * bd + o] != acc_t(0);
  if (!__syncthreads_or(redo)) return;
  acc_t t = 0, t_out = 0;
  if (redo) {
    const acc_t M = stats[o], inv = stats[bd + o];
    int64_t r0, r1;
    g.range(b, r0, r1);
    int fold = 0;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += TILE_Y) {
      if (!g.valid(b, r)) continue;
      const acc_t w = cuda::exp_diff<acc_t>(static_cast<acc_t>(*logits.at(b, r, d)), M) * inv;
      if (w != acc_t(0)) t += w * static_cast<acc_t>(*features.at(b, r, d));
      if (++fold == cuda::kFold) {
        fold = 0;
        t_out += t;
        t = 0;
      }
    }
  }
  red[threadIdx.y][threadIdx.x] = t + t_out;
  __syncthreads();
  if (threadIdx.y != 0 || !redo) return;
  acc_t sum = 0;
  for (int y = 0; y < TILE_Y; ++y) sum += red[y][threadIdx.x];
  pooled[o] = static_cast<scalar_t>(sum);
}

// weights[n, d] = e^(l - max) / sum at valid rows of a channel with weight, exactly 0 elsewhere.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS)
    channel_weights_kernel(Rows<const scalar_t> logits, Bags g, int64_t dtiles, int64_t nbags,
                           const acc_t* __restrict__ stats, Rows<scalar_t> weights) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t dtile = blockIdx.x % dtiles, b = blockIdx.x / dtiles;
  const int64_t d0 = (dtile * blockDim.x + threadIdx.x) * VEC;
  if (d0 >= g.D) return;
  int64_t r0, r1;
  g.range(b, r0, r1);
  acc_t M[VEC], inv[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    M[v] = stats[b * g.D + d0 + v];
    inv[v] = stats[nbags * g.D + b * g.D + d0 + v];
  }
  const int64_t step = static_cast<int64_t>(blockDim.y) * gridDim.y;
  for (int64_t r = r0 + static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < r1; r += step) {
    cuda::Pack<scalar_t, VEC> y;
    if (g.valid(b, r)) {
      const auto x = cuda::load_pack<scalar_t, VEC>(logits.at(b, r, d0));
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t w =
            M[v] == NEG_INF ? acc_t(0) : cuda::exp_diff<acc_t>(static_cast<acc_t>(x.v[v]), M[v]) * inv[v];
        y.v[v] = static_cast<scalar_t>(w);
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) y.v[v] = scalar_t(0);
    }
    cuda::store_pack<scalar_t, VEC>(weights.at(b, r, d0), y);
  }
}

// Packed outputs: rows that no (clamped) bag covers - only bad offsets leave any - are zeroed.
// Consecutive clamped bags never leave a gap between them (bag b ends at or after bag b+1's
// start), so only the rows before the first bag and after the last one can be uncovered.
template <typename scalar_t>
__global__ void zero_uncovered_rows_kernel(const int64_t* __restrict__ offsets, int64_t nbags, int64_t T,
                                           int64_t D, scalar_t* __restrict__ out0,
                                           scalar_t* __restrict__ out1) {
  int64_t head = T, tail = T;
  if (nbags > 0) {
    head = cuda::clamp_offset(offsets[0], T);
    tail = max(cuda::clamp_offset(offsets[nbags - 1], T), cuda::clamp_offset(offsets[nbags], T));
  }
  const int64_t n_head = head * D, n = n_head + (T - tail) * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i < n_head ? i : tail * D + (i - n_head);
    if (out0) out0[e] = scalar_t(0);
    if (out1) out1[e] = scalar_t(0);
  }
}

// ------------------------------------------------------------------------------------------ backward
//   grad_features[n, d] = w g[d];  grad_logits[n, d] = w (g[d] (f - P[d]) + gw - Q[d])
// with P = pooled (as the forward returned it) and Q[d] = sum_n w gw, summed only when the weights
// have a gradient of their own. Entries of weight 0 (padding, -inf logits, underflow) are selected
// away: their gradients are exactly 0 whatever the features or grad_pooled hold.

// Q per split: [nsplit][B][D], over the split's rows like channel_partial_kernel.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS, 2)
    channel_wsum_kernel(Rows<const scalar_t> weights, Rows<const scalar_t> grad_weights, Bags g,
                        int64_t chunk, int64_t dtiles, int64_t nbags, acc_t* __restrict__ part) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x * VEC]
  const int s = blockIdx.y, nsplit = gridDim.y;
  const int64_t dtile = blockIdx.x % dtiles, b = blockIdx.x / dtiles;
  int64_t r0, r1;
  g.range(b, r0, r1);
  const int64_t nchunks = ceil_div(r1 - r0, chunk);
  const int64_t d0 = (dtile * blockDim.x + threadIdx.x) * VEC;
  const bool active = d0 < g.D;
  acc_t q[VEC], q_out[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) q[v] = q_out[v] = acc_t(0);
  if (active) {
    int fold = 0;
    for (int64_t c = s; c < nchunks; c += nsplit) {
      const int64_t c0 = r0 + c * chunk, c1 = min(r1, c0 + chunk);
      for (int64_t rb = c0 + threadIdx.y; rb < c1; rb += static_cast<int64_t>(blockDim.y) * UNROLL) {
        cuda::Pack<scalar_t, VEC> wx[UNROLL], gx[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int64_t r = rb + static_cast<int64_t>(u) * blockDim.y;
          if (r < c1) {
            wx[u] = cuda::load_pack<scalar_t, VEC>(weights.at(b, r, d0));
            gx[u] = cuda::load_pack<scalar_t, VEC>(grad_weights.at(b, r, d0));
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) wx[u].v[v] = gx[u].v[v] = scalar_t(0);
          }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const acc_t w = static_cast<acc_t>(wx[u].v[v]);
            q[v] += w != acc_t(0) ? w * static_cast<acc_t>(gx[u].v[v]) : acc_t(0);
          }
        }
        if (++fold == cuda::kFold) {
          fold = 0;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            q_out[v] += q[v];
            q[v] = acc_t(0);
          }
        }
      }
    }
  }
  const int width = blockDim.x * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) red[threadIdx.y * width + threadIdx.x * VEC + v] = q[v] + q_out[v];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    acc_t t = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) t += red[y * width + threadIdx.x * VEC + v];
    if (d0 + v < g.D) part[(static_cast<int64_t>(s) * nbags + b) * g.D + d0 + v] = t;
  }
}

// Q[b, d] = the splits' sums, TILE_Y lanes over the splits, then lane order.
template <typename acc_t>
__global__ void __launch_bounds__(TILE_X* TILE_Y)
    channel_wsum_combine_kernel(const acc_t* __restrict__ part, int nsplit, int64_t nbags, int64_t D,
                                int64_t dblocks, acc_t* __restrict__ Q) {
  __shared__ acc_t red[TILE_Y][TILE_X + 1];
  const int64_t b = blockIdx.x / dblocks, d = (blockIdx.x % dblocks) * TILE_X + threadIdx.x;
  acc_t t = 0, t_out = 0;
  if (d < D) {
    int fold = 0;
    for (int s = threadIdx.y; s < nsplit; s += TILE_Y) {
      t += part[(static_cast<int64_t>(s) * nbags + b) * D + d];
      if (++fold == cuda::kFold) {
        fold = 0;
        t_out += t;
        t = 0;
      }
    }
  }
  red[threadIdx.y][threadIdx.x] = t + t_out;
  __syncthreads();
  if (threadIdx.y != 0 || d >= D) return;
  acc_t sum = 0;
  for (int y = 0; y < TILE_Y; ++y) sum += red[y][threadIdx.x];
  Q[b * D + d] = sum;
}

// The gradients, one pass: weights (and the features for grad_logits, grad_weights when Q is
// given) read once, each gradient written once.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS)
    channel_grads_kernel(Rows<const scalar_t> weights, Rows<const scalar_t> features,
                         Rows<const scalar_t> grad_weights, Bags g, int64_t dtiles,
                         const acc_t* __restrict__ gp, const acc_t* __restrict__ P,
                         const acc_t* __restrict__ Q, Rows<scalar_t> grad_logits,
                         Rows<scalar_t> grad_features) {
  const int64_t dtile = blockIdx.x % dtiles, b = blockIdx.x / dtiles;
  const int64_t d0 = (dtile * blockDim.x + threadIdx.x) * VEC;
  if (d0 >= g.D) return;
  int64_t r0, r1;
  g.range(b, r0, r1);
  acc_t gv[VEC], pv[VEC], qv[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    gv[v] = gp[b * g.D + d0 + v];
    pv[v] = P[b * g.D + d0 + v];
    qv[v] = Q ? Q[b * g.D + d0 + v] : acc_t(0);
  }
  const bool need_l = grad_logits.p != nullptr, need_f = grad_features.p != nullptr;
  const int64_t step = static_cast<int64_t>(blockDim.y) * gridDim.y;
  for (int64_t r = r0 + static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < r1; r += step) {
    const auto wx = cuda::load_pack<scalar_t, VEC>(weights.at(b, r, d0));
    if (need_f) {
      cuda::Pack<scalar_t, VEC> y;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t w = static_cast<acc_t>(wx.v[v]);
        y.v[v] = static_cast<scalar_t>(w != acc_t(0) ? w * gv[v] : acc_t(0));
      }
      cuda::store_pack<scalar_t, VEC>(grad_features.at(b, r, d0), y);
    }
    if (need_l) {
      const auto fx = cuda::load_pack<scalar_t, VEC>(features.at(b, r, d0));
      cuda::Pack<scalar_t, VEC> gx;
      if (Q) {
        gx = cuda::load_pack<scalar_t, VEC>(grad_weights.at(b, r, d0));
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) gx.v[v] = scalar_t(0);
      }
      cuda::Pack<scalar_t, VEC> y;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t w = static_cast<acc_t>(wx.v[v]);
        const acc_t t = gv[v] * (static_cast<acc_t>(fx.v[v]) - pv[v]) +
                        (Q ? static_cast<acc_t>(gx.v[v]) - qv[v] : acc_t(0));
        y.v[v] = static_cast<scalar_t>(w != acc_t(0) ? w * t : acc_t(0));
      }
      cuda::store_pack<scalar_t, VEC>(grad_logits.at(b, r, d0), y);
    }
  }
}

// ------------------------------------------------------------------------------------------ host side

// Unit stride along D (the kernels' loads are along D); other strides are read as they are.
st::Tensor unit_stride_d(const st::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : torch::stable::contiguous(t);
}

// 16-byte loads when D and every operand's strides and base allow them.
template <typename scalar_t>
int pick_vec(int64_t D, std::initializer_list<const st::Tensor*> ts) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (V <= 1 || D % V != 0) return 1;
  for (const st::Tensor* t : ts) {
    if (t == nullptr || !t->defined()) continue;
    for (int64_t i = 0; i + 1 < t->dim(); ++i) {
      if (t->stride(i) % V != 0) return 1;
    }
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return 1;
  }
  return V;
}

template <typename T>
Rows<T> rows_of(const st::Tensor& t, bool packed) {
  Rows<T> r;
  r.p = static_cast<T*>(t.data_ptr());
  r.s_b = packed ? 0 : t.stride(0);
  r.s_n = t.stride(-2);
  return r;
}

// The launch shape shared by the row-streaming kernels: tx threads along D (VEC channels each),
// ty thread rows; dtiles blocks per bag along D.
struct Shape {
  int tx, ty;
  int64_t dtiles;
};

Shape shape_for(int64_t D, int vec) {
  const int64_t lanes = std::max<int64_t>(1, ceil_div(D, vec));
  Shape s;
  s.tx = static_cast<int>(std::min<int64_t>(128, ceil_div(lanes, 32) * 32));
  s.ty = THREADS / s.tx;
  s.dtiles = ceil_div(lanes, s.tx);
  return s;
}

// Splits of a bag's rows for the reductions: enough blocks for every SM, each with a few passes.
int64_t splits_for(int64_t xblocks, int64_t rows_hint, int ty, int sms) {
  int64_t n = std::max<int64_t>(1, ceil_div(4LL * sms, xblocks));
  n = std::min<int64_t>(n, std::max<int64_t>(1, ceil_div(rows_hint, static_cast<int64_t>(ty) * UNROLL * 4)));
  return std::min<int64_t>(n, 65535);
}

// Blocks along the rows for the elementwise passes (weights, gradients).
int64_t row_blocks_for(int64_t xblocks, int64_t rows_hint, int ty, int sms) {
  int64_t n = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(rows_hint, static_cast<int64_t>(ty) * 4), ceil_div(4LL * sms, xblocks)));
  return std::min<int64_t>(n, 65535);
}

void check_grid(int64_t blocks, const char* what) {
  MASKATTN_CHECK(blocks <= INT32_MAX, "masked_channel_attention_pool: ", what, " = ", blocks,
                 " exceeds the CUDA grid limit");
}

Bags make_bags(const st::Tensor& features, const st::Tensor& mask, const st::Tensor& offsets) {
  Bags g{};
  const bool packed = offsets.defined();
  g.offsets = packed ? offsets.const_data_ptr<int64_t>() : nullptr;
  g.N = packed ? 0 : features.size(1);
  g.T = packed ? features.size(0) : 0;
  g.D = features.size(-1);
  g.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  g.ms_b = mask.defined() ? mask.stride(0) : 0;
  g.ms_n = mask.defined() ? mask.stride(1) : 0;
  return g;
}

template <typename scalar_t>
void zero_uncovered(const st::Tensor& offsets, int64_t nbags, int64_t T, int64_t D, scalar_t* a, scalar_t* b,
                    cudaStream_t stream, int sms) {
  zero_uncovered_rows_kernel<scalar_t>
      <<<std::max(1, 2 * sms), 256, 0, stream>>>(offsets.const_data_ptr<int64_t>(), nbags, T, D, a, b);
  MASKATTN_CUDA_LAUNCH_CHECK();
}

// rows_hint: rows per bag the host expects (N padded, T / B packed) to size the splits.
std::tuple<st::Tensor, st::Tensor> forward_cuda(const ChannelPoolInputs& in, int64_t nbags,
                                                int64_t rows_hint) {
  const int32_t dev_index = in.features.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const st::Tensor logits = unit_stride_d(in.logits);
  const st::Tensor features = unit_stride_d(in.features);
  const bool packed = in.offsets.defined();
  const int64_t D = features.size(-1);
  const st::Device dev = features.device();
  const st::ScalarType dt = features.scalar_type();
  const st::View ls = st::View::of(logits);
  st::Tensor weights = st::empty(ls.size, ls.ndim, dt, dev);
  st::Tensor pooled = st::empty({nbags, D}, dt, dev);
  if (nbags == 0 || D == 0) {
    if (packed) torch::stable::fill_(weights, 0.0);  // rows no bag covers (only unchecked offsets leave any)
    return {pooled, weights};
  }
  if (logits.numel() == 0) {  // no rows: every bag is empty
    torch::stable::fill_(pooled, 0.0);
    return {pooled, weights};
  }
  const Bags g = make_bags(features, in.mask, in.offsets);
  const cudaStream_t stream = st::current_stream(dev_index);
  const int sms = st::sm_count(dev_index);
  const st::ScalarType acc_type = st::acc_dtype(dt);

  // A generic lambda outside the dispatch macro: the commas of <<<...>>> would split its arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t) > 1 ? 16 / sizeof(scalar_t) : 1;
    const int vec = pick_vec<scalar_t>(D, {&logits, &features, &weights});
    const Shape sh = shape_for(D, vec);
    const int64_t xblocks = nbags * sh.dtiles;
    check_grid(xblocks, "B * D-tiles");
    const int64_t nsplit = splits_for(xblocks, rows_hint, sh.ty, sms);
    const int64_t chunk = std::max<int64_t>(1, ceil_div(std::max<int64_t>(rows_hint, 1), nsplit));
    const auto lr = rows_of<const scalar_t>(logits, packed);
    const auto fr = rows_of<const scalar_t>(features, packed);
    Rows<scalar_t> wr;
    wr.p = weights.mutable_data_ptr<scalar_t>();
    wr.s_b = packed ? 0 : features.size(1) * D;
    wr.s_n = D;

    st::Tensor part = st::empty({3, nsplit, nbags, D}, acc_type, dev);
    st::Tensor stats = st::empty({3, nbags, D}, acc_type, dev);
    const dim3 block(sh.tx, sh.ty);
    const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(nsplit));
    const size_t smem = 3 * static_cast<size_t>(THREADS) * vec * sizeof(acc_t);
    if (vec > 1) {
      channel_partial_kernel<scalar_t, acc_t, V>
          <<<grid, block, smem, stream>>>(lr, fr, g, chunk, sh.dtiles, nbags, part.mutable_data_ptr<acc_t>());
    } else {
      channel_partial_kernel<scalar_t, acc_t, 1>
          <<<grid, block, smem, stream>>>(lr, fr, g, chunk, sh.dtiles, nbags, part.mutable_data_ptr<acc_t>());
    }
    MASKATTN_CUDA_LAUNCH_CHECK();

    const int64_t dblocks = ceil_div(D, TILE_X);
    check_grid(nbags * dblocks, "B * ceil(D / 32)");
    const unsigned cblocks = static_cast<unsigned>(nbags * dblocks);
    channel_combine_kernel<scalar_t, acc_t><<<cblocks, dim3(TILE_X, TILE_Y), 0, stream>>>(
        part.const_data_ptr<acc_t>(), static_cast<int>(nsplit), nbags, D, dblocks,
        pooled.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
    channel_resum_kernel<scalar_t, acc_t><<<cblocks, dim3(TILE_X, TILE_Y), 0, stream>>>(
        lr, fr, g, nbags, dblocks, stats.const_data_ptr<acc_t>(), pooled.mutable_data_ptr<scalar_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();

    const dim3 wgrid(static_cast<unsigned>(xblocks),
                     static_cast<unsigned>(row_blocks_for(xblocks, rows_hint, sh.ty, sms)));
    if (vec > 1) {
      channel_weights_kernel<scalar_t, acc_t, V>
          <<<wgrid, block, 0, stream>>>(lr, g, sh.dtiles, nbags, stats.const_data_ptr<acc_t>(), wr);
    } else {
      channel_weights_kernel<scalar_t, acc_t, 1>
          <<<wgrid, block, 0, stream>>>(lr, g, sh.dtiles, nbags, stats.const_data_ptr<acc_t>(), wr);
    }
    MASKATTN_CUDA_LAUNCH_CHECK();
    if (packed) {
      zero_uncovered<scalar_t>(in.offsets, nbags, features.size(0), D, weights.mutable_data_ptr<scalar_t>(),
                               nullptr, stream, sms);
    }
  };
  THO_DISPATCH_V2(dt, "masked_channel_attention_pool_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {pooled, weights};
}

std::tuple<st::Tensor, st::Tensor> backward_cuda(const ChannelPoolGrads& gr, bool need_l, bool need_f) {
  const int32_t dev_index = gr.features.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const st::Tensor weights = unit_stride_d(gr.weights);
  const st::Tensor features = unit_stride_d(gr.features);
  const st::Tensor gw = gr.grad_weights.defined() ? unit_stride_d(gr.grad_weights) : st::Tensor();
  const bool packed = gr.offsets.defined();
  const st::Device dev = features.device();
  const st::ScalarType dt = features.scalar_type();
  const st::View ws = st::View::of(weights), fs = st::View::of(features);
  st::Tensor gl = need_l ? st::empty(ws.size, ws.ndim, dt, dev) : st::empty({0}, dt, dev);
  st::Tensor gf = need_f ? st::empty(fs.size, fs.ndim, dt, dev) : st::empty({0}, dt, dev);
  if ((!need_l && !need_f) || weights.numel() == 0) return {gl, gf};
  const int64_t nbags = packed ? gr.offsets.size(0) - 1 : features.size(0);
  const int64_t D = features.size(-1);
  const int64_t rows = packed ? features.size(0) : features.size(1);
  const int64_t rows_hint = packed ? (nbags > 0 ? ceil_div(rows, nbags) : 0) : rows;
  const Bags g = make_bags(features, st::Tensor(), gr.offsets);
  const cudaStream_t stream = st::current_stream(dev_index);
  const int sms = st::sm_count(dev_index);
  const st::ScalarType acc_type = st::acc_dtype(dt);
  const bool need_q = need_l && gw.defined();

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t) > 1 ? 16 / sizeof(scalar_t) : 1;
    scalar_t* glp = need_l ? gl.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gfp = need_f ? gf.mutable_data_ptr<scalar_t>() : nullptr;
    if (packed) zero_uncovered<scalar_t>(gr.offsets, nbags, rows, D, glp, gfp, stream, sms);
    if (nbags == 0) return;
    const st::Tensor gp = acc_contiguous(gr.grad_pooled, acc_type);
    const st::Tensor P = acc_contiguous(gr.pooled, acc_type);
    const int vec = pick_vec<scalar_t>(D, {&weights, &features, &gw, &gl, &gf});
    const Shape sh = shape_for(D, vec);
    const int64_t xblocks = nbags * sh.dtiles;
    check_grid(xblocks, "B * D-tiles");
    const auto wr = rows_of<const scalar_t>(weights, packed);
    const auto fr = rows_of<const scalar_t>(features, packed);
    const auto gwr = gw.defined() ? rows_of<const scalar_t>(gw, packed) : Rows<const scalar_t>{nullptr, 0, 0};
    Rows<scalar_t> glr{glp, packed ? 0 : rows * D, D}, gfr{gfp, packed ? 0 : rows * D, D};
    const dim3 block(sh.tx, sh.ty);

    st::Tensor Q;
    if (need_q) {
      const int64_t nsplit = splits_for(xblocks, rows_hint, sh.ty, sms);
      const int64_t chunk = std::max<int64_t>(1, ceil_div(std::max<int64_t>(rows_hint, 1), nsplit));
      st::Tensor part = st::empty({nsplit, nbags, D}, acc_type, dev);
      const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(nsplit));
      const size_t smem = static_cast<size_t>(THREADS) * vec * sizeof(acc_t);
      if (vec > 1) {
        channel_wsum_kernel<scalar_t, acc_t, V><<<grid, block, smem, stream>>>(
            wr, gwr, g, chunk, sh.dtiles, nbags, part.mutable_data_ptr<acc_t>());
      } else {
        channel_wsum_kernel<scalar_t, acc_t, 1><<<grid, block, smem, stream>>>(
            wr, gwr, g, chunk, sh.dtiles, nbags, part.mutable_data_ptr<acc_t>());
      }
      MASKATTN_CUDA_LAUNCH_CHECK();
      const int64_t dblocks = ceil_div(D, TILE_X);
      check_grid(nbags * dblocks, "B * ceil(D / 32)");
      Q = st::empty({nbags, D}, acc_type, dev);
      channel_wsum_combine_kernel<acc_t>
          <<<static_cast<unsigned>(nbags * dblocks), dim3(TILE_X, TILE_Y), 0, stream>>>(
              part.const_data_ptr<acc_t>(), static_cast<int>(nsplit), nbags, D, dblocks,
              Q.mutable_data_ptr<acc_t>());
      MASKATTN_CUDA_LAUNCH_CHECK();
    }

    const dim3 grid(static_cast<unsigned>(xblocks),
                    static_cast<unsigned>(row_blocks_for(xblocks, rows_hint, sh.ty, sms)));
    const acc_t* qp = need_q ? Q.const_data_ptr<acc_t>() : nullptr;
    if (vec > 1) {
      channel_grads_kernel<scalar_t, acc_t, V><<<grid, block, 0, stream>>>(
          wr, fr, gwr, g, sh.dtiles, gp.const_data_ptr<acc_t>(), P.const_data_ptr<acc_t>(), qp, glr, gfr);
    } else {
      channel_grads_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(
          wr, fr, gwr, g, sh.dtiles, gp.const_data_ptr<acc_t>(), P.const_data_ptr<acc_t>(), qp, glr, gfr);
    }
    MASKATTN_CUDA_LAUNCH_CHECK();
  };
  THO_DISPATCH_V2(dt, "masked_channel_attention_pool_backward_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {gl, gf};
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_cuda(const st::Tensor& logits,
                                                                      const st::Tensor& features,
                                                                      const std::optional<st::Tensor>& mask) {
  const ChannelPoolInputs in = check_channel_pool_inputs(logits, features, mask);
  return forward_cuda(in, features.size(0), features.size(1));
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_packed_cuda(const st::Tensor& logits,
                                                                             const st::Tensor& features,
                                                                             const st::Tensor& offsets) {
  const ChannelPoolInputs in = check_channel_pool_packed_inputs(logits, features, offsets);
  const int64_t nbags = in.offsets.size(0) - 1;
  return forward_cuda(in, nbags, nbags > 0 ? ceil_div(features.size(0), nbags) : 0);
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_backward_cuda(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& pooled,
    const st::Tensor& weights, const st::Tensor& features, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  return backward_cuda(
      check_channel_pool_grads(grad_pooled, grad_weights, pooled, weights, features, std::nullopt),
      output_mask[0], output_mask[1]);
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_packed_backward_cuda(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& pooled,
    const st::Tensor& weights, const st::Tensor& features, const st::Tensor& offsets,
    std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  return backward_cuda(
      check_channel_pool_grads(grad_pooled, grad_weights, pooled, weights, features, offsets), output_mask[0],
      output_mask[1]);
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("masked_channel_attention_pool", TORCH_BOX(&maskattn::masked_channel_attention_pool_cuda));
  m.impl("_masked_channel_attention_pool_backward",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_backward_cuda));
  m.impl("masked_channel_attention_pool_packed",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_packed_cuda));
  m.impl("_masked_channel_attention_pool_packed_backward",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_packed_backward_cuda));
}
