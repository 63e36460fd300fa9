// CPU kernels of masked_channel_attention_pool (padded and packed) and their backward.
//
// PyG's feature-level gate: channel d of bag b has a softmax of its own over the bag's valid rows,
// w[n, d] = softmax_n(l[n, d]), pooled[b, d] = sum_n w[n, d] f[n, d]. The loops run along the
// channels, eight at a time, with the rows as the outer loop: one pass over the logits and features
// keeps a per-channel online state (max, sum of e^(l - max), sum of e^(l - max) f), then a second
// pass over the logits writes the weights. Rows are taken in blocks of kBlockRows that share one max
// (the exp then needs no rescaling inside a block); the block states are merged pairwise
// (log-sum-exp, common/cascade_sum.h's binary counter), so no running sum grows longer than a block.
//
// Work items are (bag, channel tile, chunk of kChunkRows rows); a bag's chunks are merged in a
// fixed order. Neither depends on the thread count: the result is the same on 1 thread or 64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/stable.h"
#include "masked_channel_attention_pool.h"

namespace maskattn {
namespace {

// Channels of one work item: a block of their logits (kBlockRows x kTile floats, 32 KiB) stays in
// L1 between the max and the exp pass.
constexpr int64_t kTile = 128;
// Rows sharing one block max; also the longest running sum.
constexpr int64_t kBlockRows = 64;
// Rows of one work item: a whole-slide bag (10^5 rows) still spreads over every thread.
constexpr int64_t kChunkRows = 64 * kBlockRows;
// Elements a parallel task should hold before starting threads is worth it.
constexpr int64_t kGrainElems = 1 << 15;

// A [rows, D] operand read through its strides (features, logits, weights, grad_weights).
template <typename scalar_t>
struct Operand {
  const scalar_t* p = nullptr;
  int64_t s_n = 0, s_d = 0;

  // Channels [d0, d0 + nd) of the row at element offset `off`, as acc_t: in place when the dtype
  // and unit stride allow, else copied into buf.
  template <typename acc_t>
  const acc_t* row(int64_t off, int64_t d0, int64_t nd, acc_t* buf) const {
    const scalar_t* r = p + off + d0 * s_d;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (s_d == 1) return r;
    }
    for (int64_t d = 0; d < nd; ++d) buf[d] = static_cast<acc_t>(r[d * s_d]);
    return buf;
  }
};

struct Bag {
  int64_t len;    // rows
  int64_t row0;   // row index of row 0 in the contiguous [rows, D] outputs
  int64_t l_off;  // element offset of row 0 in the logits (forward) or the weights (backward)
  int64_t f_off;  // ... in the features
  int64_t x_off;  // ... in the mask (forward) or grad_weights (backward), where there is one
};

struct Item {
  int64_t bag, d0, d1, r0, r1;
};

// Work items grouped by (bag, tile): group g = bag * ntiles + tile holds items first[g]..first[g+1].
struct Plan {
  std::vector<Item> items;
  std::vector<int64_t> first;
  int64_t ntiles = 0, width = 0;  // tiles per bag and the widest tile
  int64_t grain = 1;              // items per task
};

Plan make_plan(const std::vector<Bag>& bags, int64_t D) {
  Plan p;
  p.ntiles = std::max<int64_t>(1, (D + kTile - 1) / kTile);
  // equal tiles, a multiple of the 8-wide vectors where D allows
  p.width = std::min<int64_t>(D, ((D + p.ntiles - 1) / p.ntiles + 7) / 8 * 8);
  p.first.reserve(bags.size() * p.ntiles + 1);
  int64_t elems = 0;
  for (size_t b = 0; b < bags.size(); ++b) {
    for (int64_t t = 0; t < p.ntiles; ++t) {
      p.first.push_back(static_cast<int64_t>(p.items.size()));
      const int64_t d0 = t * p.width, d1 = std::min(D, d0 + p.width);
      if (d0 >= d1) continue;
      for (int64_t r = 0; r < bags[b].len; r += kChunkRows) {
        p.items.push_back({static_cast<int64_t>(b), d0, d1, r, std::min(bags[b].len, r + kChunkRows)});
        elems += (p.items.back().r1 - r) * (d1 - d0);
      }
    }
  }
  p.first.push_back(static_cast<int64_t>(p.items.size()));
  const int64_t n = static_cast<int64_t>(p.items.size());
  p.grain = n ? std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems / n)) : 1;
  return p;
}

// ---- the per-block math: float32 through the vectorised cpu_vec helpers, float64 here ----
// A state is m, s, a (max, sum of e^(l - m), sum of e^(l - m) f) of n channels at st, st + stride
// and st + 2 * stride.

template <typename acc_t>
void block_state(const acc_t* const* l, const acc_t* const* f, int nrows, int64_t n, int64_t stride,
                 acc_t* st) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t d = 0; d < n; ++d) {
    acc_t mx = l[0][d];
    for (int j = 1; j < nrows; ++j) mx = (l[j][d] > mx || l[j][d] != l[j][d]) ? l[j][d] : mx;
    acc_t s = 0, a = 0;
    if (mx != ninf) {
      for (int j = 0; j < nrows; ++j) {
        const acc_t e = cpu::exp_diff(l[j][d], mx);
        s += e;
        a += e != acc_t(0) ? e * f[j][d] : acc_t(0);
      }
    }
    st[d] = mx;
    st[stride + d] = s;
    st[2 * stride + d] = a;
  }
}

inline void block_state(const float* const* l, const float* const* f, int nrows, int64_t n, int64_t stride,
                        float* st) {
  if (cpu::channel_softmax_block_f32(l, f, nrows, n, st, st + stride, st + 2 * stride, false)) {
    cpu::channel_softmax_block_f32(l, f, nrows, n, st, st + stride, st + 2 * stride, true);
  }
}

template <typename acc_t>
void merge_states(const acc_t* x, const acc_t* y, acc_t* out, int64_t n, int64_t stride) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t d = 0; d < n; ++d) {
    const acc_t p = x[d], q = y[d];
    const acc_t mx = (q > p || q != q) ? q : p;
    const acc_t c1 = p == ninf ? acc_t(0) : cpu::exp_diff(p, mx);
    const acc_t c2 = q == ninf ? acc_t(0) : cpu::exp_diff(q, mx);
    const int64_t S = stride, A = 2 * stride;
    const acc_t s = (c1 != acc_t(0) ? x[S + d] * c1 : acc_t(0)) + (c2 != acc_t(0) ? y[S + d] * c2 : acc_t(0));
    const acc_t a = (c1 != acc_t(0) ? x[A + d] * c1 : acc_t(0)) + (c2 != acc_t(0) ? y[A + d] * c2 : acc_t(0));
    out[d] = mx;
    out[S + d] = s;
    out[A + d] = a;
  }
}

inline void merge_states(const float* x, const float* y, float* out, int64_t n, int64_t stride) {
  cpu::channel_state_merge_f32(x, y, out, n, stride);
}

template <typename acc_t>
void weights_row(const acc_t* l, const acc_t* m, const acc_t* inv, int64_t n, acc_t* w) {
  for (int64_t d = 0; d < n; ++d) w[d] = cpu::exp_diff(l[d], m[d]) * inv[d];
}

inline void weights_row(const float* l, const float* m, const float* inv, int64_t n, float* w) {
  if (cpu::channel_weights_row_f32(l, m, inv, n, w, false))
    cpu::channel_weights_row_f32(l, m, inv, n, w, true);
}

// The online-softmax states of n channels (planes of `stride` values: max, sum, acc) as an
// ArrayCascade merge: block states merged pairwise, so no running sum grows longer than a block.
template <typename acc_t>
struct StateMerge {
  int64_t n, stride;
  int64_t size() const { return 3 * stride; }
  void init(acc_t*) const {}         // block_state writes every value in use
  void identity(acc_t* out) const {  // no row: max -inf, sums 0
    std::fill(out, out + stride, -std::numeric_limits<acc_t>::infinity());
    std::fill(out + stride, out + 3 * stride, acc_t(0));
  }
  void merge(const acc_t* l, acc_t* acc) const { merge_states(l, acc, acc, n, stride); }
};

// ---- forward ----

template <typename scalar_t>
struct FwdArgs {
  Operand<scalar_t> logits, features;
  const bool* mask;  // null: all valid
  int64_t ms_n;
  int64_t D;
};

template <typename scalar_t>
void channel_pool_forward(const FwdArgs<scalar_t>& A, const std::vector<Bag>& bags, scalar_t* pooled,
                          scalar_t* weights) {
  using acc_t = st::acc_t<scalar_t>;
  const int64_t D = A.D, B = static_cast<int64_t>(bags.size());
  const Plan plan = make_plan(bags, D);
  const int64_t W = plan.width, nitems = static_cast<int64_t>(plan.items.size());
  auto valid = [&](const Bag& bag, int64_t r) { return A.mask == nullptr || A.mask[bag.x_off + r * A.ms_n]; };

  // 1) each item's state over its rows
  std::vector<acc_t> parts(nitems * 3 * W);
  torch::stable::parallel_for(0, nitems, plan.grain, [&](int64_t i0, int64_t i1) {
    cpu::ArrayCascade<acc_t, StateMerge<acc_t>> cascade(StateMerge<acc_t>{W, W});
    std::vector<acc_t> lbuf(kBlockRows * W), fbuf(kBlockRows * W);
    const acc_t* lrows[kBlockRows];
    const acc_t* frows[kBlockRows];
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = plan.items[i];
      const Bag& bag = bags[it.bag];
      const int64_t nd = it.d1 - it.d0;
      cascade.reset(StateMerge<acc_t>{nd, W});
      int nr = 0;
      auto flush = [&] {
        acc_t* st = cascade.block();
        block_state(lrows, frows, nr, nd, W, st);
        cascade.add_block(st);
        nr = 0;
      };
      for (int64_t r = it.r0; r < it.r1; ++r) {
        if (!valid(bag, r)) continue;  // padding rows are never read
        lrows[nr] = A.logits.row(bag.l_off + r * A.logits.s_n, it.d0, nd, lbuf.data() + nr * W);
        frows[nr] = A.features.row(bag.f_off + r * A.features.s_n, it.d0, nd, fbuf.data() + nr * W);
        if (++nr == kBlockRows) flush();
      }
      if (nr) flush();
      cascade.total(parts.data() + i * 3 * W);
    }
  });

  // 2) per (bag, tile): merge the chunks; pooled = a / s; the weights pass gets max and 1 / s
  // (a channel with no weight: max 0 and 1 / s = 0, so e^(-inf - 0) * 0 = 0 at its -inf rows)
  const int64_t G = B * plan.ntiles;
  std::vector<acc_t> stats(B * D * 2);  // [B, D] max, then [B, D] 1 / sum
  acc_t* smax = stats.data();
  acc_t* sinv = stats.data() + B * D;
  const int64_t group_grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, W));
  torch::stable::parallel_for(0, G, group_grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / plan.ntiles, nparts = plan.first[g + 1] - plan.first[g];
      const int64_t d0 = (g % plan.ntiles) * W, d1 = std::min(D, d0 + W), nd = d1 - d0;
      if (d0 >= D) continue;
      if (nparts == 0) {  // an empty bag
        for (int64_t d = d0; d < d1; ++d) {
          pooled[b * D + d] = scalar_t(0);
          smax[b * D + d] = sinv[b * D + d] = acc_t(0);
        }
        continue;
      }
      acc_t* st = parts.data() + plan.first[g] * 3 * W;
      cpu::pairwise_merge_inplace(st, nparts, 3 * W,
                                  [&](acc_t* x, const acc_t* y) { merge_states(x, y, x, nd, W); });
      const Bag& bag = bags[b];
      for (int64_t k = 0; k < nd; ++k) {
        const int64_t d = d0 + k;
        const acc_t mx = st[k], s = st[W + k];
        const bool none = mx == -std::numeric_limits<acc_t>::infinity();
        const acc_t inv = none ? acc_t(0) : acc_t(1) / s;
        acc_t p = st[2 * W + k] * inv;
        if (!none && std::isfinite(mx) && std::isfinite(s) && !std::isfinite(p)) {
          // inf / NaN in a feature row whose block gave it a nonzero e: the row may still weigh
          // exactly 0 in the end (far below the bag's max). Redo this channel from the final
          // weights, skipping the rows of weight 0, so that only rows with weight > 0 are read.
          cpu::BlockedSum<acc_t, kBlockRows> sum;
          for (int64_t r = 0; r < bag.len; ++r) {
            if (!valid(bag, r)) continue;
            const acc_t l = static_cast<acc_t>(A.logits.p[bag.l_off + r * A.logits.s_n + d * A.logits.s_d]);
            const acc_t w = cpu::exp_diff(l, mx) * inv;
            if (w == acc_t(0)) continue;
            const acc_t f =
                static_cast<acc_t>(A.features.p[bag.f_off + r * A.features.s_n + d * A.features.s_d]);
            sum.add(w * f);
          }
          p = sum.total();
        }
        pooled[b * D + d] = none ? scalar_t(0) : static_cast<scalar_t>(p);
        smax[b * D + d] = none ? acc_t(0) : mx;
        sinv[b * D + d] = inv;
      }
    }
  });

  // 3) the weights, row by row (padding: exactly 0)
  torch::stable::parallel_for(0, nitems, plan.grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> lbuf(W), wbuf(W);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = plan.items[i];
      const Bag& bag = bags[it.bag];
      const int64_t nd = it.d1 - it.d0;
      const acc_t* mx = smax + it.bag * D + it.d0;
      const acc_t* inv = sinv + it.bag * D + it.d0;
      for (int64_t r = it.r0; r < it.r1; ++r) {
        scalar_t* out = weights + (bag.row0 + r) * D + it.d0;
        if (!valid(bag, r)) {
          std::fill(out, out + nd, scalar_t(0));
          continue;
        }
        const acc_t* l = A.logits.row(bag.l_off + r * A.logits.s_n, it.d0, nd, lbuf.data());
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          weights_row(l, mx, inv, nd, out);
        } else {
          weights_row(l, mx, inv, nd, wbuf.data());
          for (int64_t k = 0; k < nd; ++k) out[k] = static_cast<scalar_t>(wbuf[k]);
        }
      }
    }
  });
}

// ---- backward ----
//   grad_features[n, d] = w g[d];  grad_logits[n, d] = w (g[d] (f - P[d]) + gw - Q[d])
// with P = pooled (sum_n w f, as the forward returned it) and Q[d] = sum_n w gw, summed only when
// the weights have a gradient of their own. Without one, the backward is a single pass: weights and
// features read once, each gradient written once. Entries of weight 0 (padding, -inf logits,
// underflow) are selected away: their gradients are exactly 0 and their features are never used.

template <typename scalar_t>
struct BwdArgs {
  Operand<scalar_t> weights, features, grad_weights;  // grad_weights.p null: none
  const st::acc_t<scalar_t>* gp;                      // [B, D] contiguous
  const st::acc_t<scalar_t>* pooled;                  // [B, D] contiguous
  int64_t D;
};

template <typename acc_t>
void wsum_row(const acc_t* w, const acc_t* gw, int64_t n, acc_t* q) {
  for (int64_t d = 0; d < n; ++d) q[d] += w[d] != acc_t(0) ? w[d] * gw[d] : acc_t(0);
}

template <typename acc_t, typename out_t>
void grads_row(const acc_t* w, const acc_t* f, const acc_t* gw, const acc_t* g, const acc_t* P,
               const acc_t* Q, int64_t n, out_t* gl, out_t* gf) {
  if (gf) {
    for (int64_t d = 0; d < n; ++d) gf[d] = static_cast<out_t>(w[d] != acc_t(0) ? w[d] * g[d] : acc_t(0));
  }
  if (gl && gw) {
    for (int64_t d = 0; d < n; ++d) {
      const acc_t t = g[d] * (f[d] - P[d]) + (gw[d] - Q[d]);
      gl[d] = static_cast<out_t>(w[d] != acc_t(0) ? w[d] * t : acc_t(0));
    }
  } else if (gl) {
    for (int64_t d = 0; d < n; ++d) {
      gl[d] = static_cast<out_t>(w[d] != acc_t(0) ? w[d] * (g[d] * (f[d] - P[d])) : acc_t(0));
    }
  }
}

template <typename scalar_t>
void channel_pool_backward(const BwdArgs<scalar_t>& A, const std::vector<Bag>& bags, scalar_t* gl,
                           scalar_t* gf) {
  using acc_t = st::acc_t<scalar_t>;
  const int64_t D = A.D;
  const Plan plan = make_plan(bags, D);
  const int64_t W = plan.width, nitems = static_cast<int64_t>(plan.items.size());
  const bool need_q = gl != nullptr && A.grad_weights.p != nullptr;

  // 1) Q per item: blocks of kBlockRows rows summed pairwise; then a bag's chunks, pairwise in a
  // fixed order, into its first item
  std::vector<acc_t> parts(need_q ? nitems * W : 0);
  if (need_q) {
    torch::stable::parallel_for(0, nitems, plan.grain, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> wb(W), gb(W);
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = plan.items[i];
        const Bag& bag = bags[it.bag];
        const int64_t nd = it.d1 - it.d0;
        auto sum_rows = [&](int64_t r0, int64_t r1, acc_t* q) {
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t* w = A.weights.row(bag.l_off + r * A.weights.s_n, it.d0, nd, wb.data());
            const acc_t* gw = A.grad_weights.row(bag.x_off + r * A.grad_weights.s_n, it.d0, nd, gb.data());
            wsum_row(w, gw, nd, q);
          }
        };
        acc_t* out = parts.data() + i * W;
        if (it.r1 - it.r0 <= kBlockRows) {
          std::fill(out, out + W, acc_t(0));
          sum_rows(it.r0, it.r1, out);
          continue;
        }
        cpu::ArrayCascade<acc_t> cascade(W);
        for (int64_t r0 = it.r0; r0 < it.r1; r0 += kBlockRows) {
          acc_t* blk = cascade.block();
          sum_rows(r0, std::min(it.r1, r0 + kBlockRows), blk);
          cascade.add_block(blk);
        }
        cascade.total(out);
      }
    });
    const int64_t G = static_cast<int64_t>(plan.first.size()) - 1;
    const int64_t group_grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, W));
    torch::stable::parallel_for(0, G, group_grain, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n = plan.first[g + 1] - plan.first[g];
        if (n > 1) cpu::pairwise_reduce_inplace(parts.data() + plan.first[g] * W, n, W, W);
      }
    });
  }

  // 2) the gradients, row by row
  torch::stable::parallel_for(0, nitems, plan.grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> wb(W), fb(W), gb(W);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = plan.items[i];
      const Bag& bag = bags[it.bag];
      const int64_t nd = it.d1 - it.d0;
      const acc_t* g = A.gp + it.bag * D + it.d0;
      const acc_t* P = A.pooled + it.bag * D + it.d0;
      const acc_t* Q = need_q ? parts.data() + plan.first[it.bag * plan.ntiles + it.d0 / W] * W : nullptr;
      for (int64_t r = it.r0; r < it.r1; ++r) {
        const int64_t row = bag.row0 + r;
        const acc_t* w = A.weights.row(bag.l_off + r * A.weights.s_n, it.d0, nd, wb.data());
        const acc_t* f = gl ? A.features.row(bag.f_off + r * A.features.s_n, it.d0, nd, fb.data()) : nullptr;
        const acc_t* gw =
            need_q ? A.grad_weights.row(bag.x_off + r * A.grad_weights.s_n, it.d0, nd, gb.data()) : nullptr;
        grads_row(w, f, gw, g, P, Q, nd, gl ? gl + row * D + it.d0 : nullptr,
                  gf ? gf + row * D + it.d0 : nullptr);
      }
    }
  });
}

// ---- bags of the two layouts ----

// l: logits or weights; x: the mask or grad_weights (may be undefined).
std::vector<Bag> padded_bags(const st::Tensor& l, const st::Tensor& f, const st::Tensor& x) {
  const int64_t B = f.size(0), N = f.size(1);
  const int64_t ls = l.stride(0), fs = f.stride(0), xs = x.defined() ? x.stride(0) : 0;
  std::vector<Bag> bags(B);
  for (int64_t b = 0; b < B; ++b) bags[b] = {N, b * N, b * ls, b * fs, b * xs};
  return bags;
}

std::vector<Bag> packed_bags(const st::Tensor& l, const st::Tensor& f, const st::Tensor& x,
                             const st::Tensor& offsets) {
  const int64_t B = offsets.size(0) - 1;
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t ls = l.stride(0), fs = f.stride(0), xs = x.defined() ? x.stride(0) : 0;
  std::vector<Bag> bags(B);
  for (int64_t b = 0; b < B; ++b) bags[b] = {o[b + 1] - o[b], o[b], o[b] * ls, o[b] * fs, o[b] * xs};
  return bags;
}

template <typename scalar_t>
Operand<scalar_t> operand(const st::Tensor& t) {
  Operand<scalar_t> o;
  const int64_t nd = t.dim();
  o.p = t.const_data_ptr<scalar_t>();
  o.s_n = t.stride(nd - 2);
  o.s_d = t.size(nd - 1) == 1 ? 1 : t.stride(nd - 1);
  return o;
}

// pooled [B, D] and weights (contiguous, logits' shape), both new tensors (never views).
std::tuple<st::Tensor, st::Tensor> forward_cpu(const ChannelPoolInputs& in, const std::vector<Bag>& bags) {
  const int64_t B = static_cast<int64_t>(bags.size()), D = in.features.size(-1);
  const st::Device dev = in.features.device();
  const st::ScalarType dt = in.features.scalar_type();
  const st::View ls = st::View::of(in.logits);
  st::Tensor pooled = st::zeros({B, D}, dt, dev);
  st::Tensor weights = cpu::empty_large(ls.size, ls.ndim, dt, dev, "masked_channel_attention_pool");
  if (in.logits.numel() == 0) return {pooled, weights};
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    FwdArgs<scalar_t> a;
    a.logits = operand<scalar_t>(in.logits);
    a.features = operand<scalar_t>(in.features);
    a.mask = in.mask.defined() ? in.mask.const_data_ptr<bool>() : nullptr;
    a.ms_n = in.mask.defined() ? in.mask.stride(1) : 0;
    a.D = D;
    channel_pool_forward<scalar_t>(a, bags, pooled.mutable_data_ptr<scalar_t>(),
                                   weights.mutable_data_ptr<scalar_t>());
  };
  THO_DISPATCH_V2(dt, "masked_channel_attention_pool_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {pooled, weights};
}

std::tuple<st::Tensor, st::Tensor> backward_cpu(const ChannelPoolGrads& g, const std::vector<Bag>& bags,
                                                bool need_logits, bool need_features) {
  const st::Tensor& w = g.weights;
  const st::Tensor& f = g.features;
  const st::Device dev = f.device();
  const st::ScalarType dt = f.scalar_type();
  const st::View ws = st::View::of(w), fs = st::View::of(f);
  const char* op = "masked_channel_attention_pool";
  st::Tensor gl = need_logits ? cpu::empty_large(ws.size, ws.ndim, dt, dev, op) : st::empty({0}, dt, dev);
  st::Tensor gf = need_features ? cpu::empty_large(fs.size, fs.ndim, dt, dev, op) : st::empty({0}, dt, dev);
  if ((!need_logits && !need_features) || w.numel() == 0) return {gl, gf};
  const st::ScalarType acc_type = st::acc_dtype(dt);
  const st::Tensor gp = acc_contiguous(g.grad_pooled, acc_type);
  const st::Tensor pooled = acc_contiguous(g.pooled, acc_type);
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    BwdArgs<scalar_t> a;
    a.weights = operand<scalar_t>(w);
    a.features = operand<scalar_t>(f);
    if (g.grad_weights.defined()) a.grad_weights = operand<scalar_t>(g.grad_weights);
    a.gp = gp.const_data_ptr<acc_t>();
    a.pooled = pooled.const_data_ptr<acc_t>();
    a.D = f.size(-1);
    channel_pool_backward<scalar_t>(a, bags, need_logits ? gl.mutable_data_ptr<scalar_t>() : nullptr,
                                    need_features ? gf.mutable_data_ptr<scalar_t>() : nullptr);
  };
  THO_DISPATCH_V2(dt, "masked_channel_attention_pool_backward_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {gl, gf};
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_cpu(const st::Tensor& logits,
                                                                     const st::Tensor& features,
                                                                     const std::optional<st::Tensor>& mask) {
  const ChannelPoolInputs in = check_channel_pool_inputs(logits, features, mask);
  return forward_cpu(in, padded_bags(in.logits, in.features, in.mask));
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_packed_cpu(const st::Tensor& logits,
                                                                            const st::Tensor& features,
                                                                            const st::Tensor& offsets) {
  const ChannelPoolInputs in = check_channel_pool_packed_inputs(logits, features, offsets);
  return forward_cpu(in, packed_bags(in.logits, in.features, st::Tensor(), in.offsets));
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_backward_cpu(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& pooled,
    const st::Tensor& weights, const st::Tensor& features, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  const ChannelPoolGrads g =
      check_channel_pool_grads(grad_pooled, grad_weights, pooled, weights, features, std::nullopt);
  return backward_cpu(g, padded_bags(g.weights, g.features, g.grad_weights), output_mask[0], output_mask[1]);
}

std::tuple<st::Tensor, st::Tensor> masked_channel_attention_pool_packed_backward_cpu(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& pooled,
    const st::Tensor& weights, const st::Tensor& features, const st::Tensor& offsets,
    std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  const ChannelPoolGrads g =
      check_channel_pool_grads(grad_pooled, grad_weights, pooled, weights, features, offsets);
  return backward_cpu(g, packed_bags(g.weights, g.features, g.grad_weights, g.offsets), output_mask[0],
                      output_mask[1]);
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("masked_channel_attention_pool", TORCH_BOX(&maskattn::masked_channel_attention_pool_cpu));
  m.impl("_masked_channel_attention_pool_backward",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_backward_cpu));
  m.impl("masked_channel_attention_pool_packed",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_packed_cpu));
  m.impl("_masked_channel_attention_pool_packed_backward",
         TORCH_BOX(&maskattn::masked_channel_attention_pool_packed_backward_cpu));
}
