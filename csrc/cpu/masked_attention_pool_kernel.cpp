// CPU kernels of masked_attention_pool (padded and packed) and their backward.
//
// Both layouts reduce to a list of bags, each a run of rows with its own base offsets, so one set
// of kernels serves both. The features tensor, the only large one, is streamed exactly once in
// the forward and once in the backward; everything else is O(B*N*K).
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cascade_sum.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "common/stable.h"
#include "masked_attention_pool.h"

namespace maskattn {
namespace {

struct Bag {
  int64_t len;    // rows in this bag
  int64_t f_off;  // element offset of row 0 in features
  int64_t l_off;  // element offset of row 0 in logits
  int64_t m_off;  // element offset of row 0 in the mask (unused without a mask)
  int64_t w_off;  // element offset of row 0 in the contiguous [rows, K] weights
};

// Strides of the row dimension (and K/D dimensions) shared by all bags.
struct Layout {
  int64_t K, D;
  int64_t ls_n, ls_k;  // logits
  int64_t fs_n, fs_d;  // features
  int64_t ms_n;        // mask
};

// A chunk of consecutive rows of one bag: the unit of parallel work over the features.
struct Chunk {
  int64_t bag, r0, r1;
};

int64_t total_rows(const std::vector<Bag>& bags) {
  int64_t total = 0;
  for (const auto& b : bags) total += b.len;
  return total;
}

// Enough chunks to keep every thread busy even for B = 1, few enough that the per-chunk partial
// sums (K*D floats each) stay negligible next to the features.
std::vector<Chunk> make_chunks(const std::vector<Bag>& bags, std::vector<int64_t>& first_chunk) {
  const int64_t total = total_rows(bags);
  const int64_t nt = std::max<int64_t>(1, static_cast<int64_t>(torch::stable::get_num_threads()));
  const int64_t rows = std::max<int64_t>(64, (total + 4 * nt - 1) / (4 * nt));
  std::vector<Chunk> chunks;
  first_chunk.assign(bags.size() + 1, 0);
  for (size_t b = 0; b < bags.size(); ++b) {
    first_chunk[b] = static_cast<int64_t>(chunks.size());
    for (int64_t r = 0; r < bags[b].len; r += rows) {
      chunks.push_back({static_cast<int64_t>(b), r, std::min(bags[b].len, r + rows)});
    }
  }
  first_chunk[bags.size()] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Eight partial sums added as a tree.
template <typename acc_t>
inline acc_t tree8(const acc_t* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// v[r] = e^(v[r] - mx) in place, returning the sum: float through the vectorised cpu::exp_sum_f32
// (refill() restores v when a weight is subnormal, for its exact pass); double with std::exp over
// blocks of eight running sums, the blocks added pairwise. A bag's denominator is a sum of up to
// 10^6 terms (common/cascade_sum.h).
template <typename Refill>
inline float exp_sum(float* v, int64_t n, float mx, Refill&& refill) {
  bool tiny = false;
  const float s = cpu::exp_sum_f32(v, n, mx, &tiny);
  if (!tiny) return s;
  refill();
  return cpu::exp_sum_careful_f32(v, n, mx);
}

template <typename Refill>
inline double exp_sum(double* v, int64_t n, double mx, Refill&&) {
  cpu::Cascade<double> sum;
  for (int64_t r0 = 0; r0 < n; r0 += cpu::kSumBlock) {
    const int64_t r1 = std::min(n, r0 + cpu::kSumBlock);
    double s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t r = r0; r < r1; ++r) {
      v[r] = cpu::exp_diff(v[r], mx);
      s8[(r - r0) & 7] += v[r];
    }
    sum.add(tree8(s8));
  }
  return sum.total();
}

// Softmax over each bag's valid rows, per branch k, into w (contiguous [rows, K], accumulation
// type). A bag with no valid row, or whose valid logits are all -inf, gets all-zero weights.
template <typename scalar_t, typename acc_t>
void bag_softmax(const scalar_t* logits, const bool* mask, const std::vector<Bag>& bags, const Layout& L,
                 acc_t* w) {
  const int64_t K = L.K;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t nb = static_cast<int64_t>(bags.size());
  torch::stable::parallel_for(0, nb, grain_for(total_rows(bags) * K, nb), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf;  // one branch's column when K > 1, so the exp runs on contiguous values
    for (int64_t b = b0; b < b1; ++b) {
      const Bag& bag = bags[b];
      const int64_t n = bag.len;
      if (K > 1) buf.resize(n);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* l = logits + bag.l_off + k * L.ls_k;
        acc_t* wk = w + bag.w_off + k;
        acc_t* v = K == 1 ? wk : buf.data();
        auto valid = [&](int64_t r) { return mask == nullptr || mask[bag.m_off + r * L.ms_n]; };
        auto fill = [&] {
          for (int64_t r = 0; r < n; ++r) v[r] = valid(r) ? static_cast<acc_t>(l[r * L.ls_n]) : ninf;
        };
        fill();
        acc_t mx = ninf;
        // NaN wins: a bag whose valid logits are NaN (and -inf) must come out NaN, not "empty"
        for (int64_t r = 0; r < n; ++r) mx = (v[r] > mx || v[r] != v[r]) ? v[r] : mx;
        if (mx == ninf) {
          for (int64_t r = 0; r < n; ++r) wk[r * K] = acc_t(0);
          continue;
        }
        const acc_t inv = acc_t(1) / exp_sum(v, n, mx, fill);
        // Padding keeps weight exactly 0 even when a NaN / +inf logit makes inv NaN (0 * NaN would
        // poison it, and the backward, which sees only the weights, would then read the padding).
        for (int64_t r = 0; r < n; ++r) wk[r * K] = valid(r) ? v[r] * inv : acc_t(0);
      }
    }
  });
}

// Live rows summed into one block buffer before the block goes to the pairwise cascade: short
// enough that the running sum stays accurate, long enough that merging the blocks (about one extra
// pass over K*D values per block, in cache) is lost in streaming the rows from memory.
constexpr int64_t kPoolBlock = 128;

// Partial pooled sums of one chunk into part[K*D]. Rows whose weight is zero (padding, and for
// K > 1 per branch) are skipped, so nothing stored there - not even NaN - can reach the result.
// The rows are summed in blocks of kPoolBlock live rows and the blocks pairwise
// (common/cascade_sum.h): a chunk of a whole-slide bag holds 10^5 rows, and one running sum over
// them loses about as many bits as a serial softmax denominator.
template <typename scalar_t, typename acc_t>
void pool_chunk(const scalar_t* f, const acc_t* w, const Bag& bag, const Chunk& c, const Layout& L,
                acc_t* part) {
  const int64_t K = L.K, D = L.D;
  std::fill(part, part + K * D, acc_t(0));
  if (L.fs_d == 1) {
    cpu::ArrayCascade<acc_t> cascade(K * D);
    acc_t* blk = cascade.block();
    int64_t live = 0;  // live rows in blk
    auto flush = [&] {
      cascade.add_block(blk);
      blk = cascade.block();
      live = 0;
    };
    if (K == 1) {
      const scalar_t* rows[8];
      acc_t ws[8];
      int n = 0;
      for (int64_t r = c.r0; r < c.r1; ++r) {
        const acc_t wr = w[bag.w_off + r];
        if (wr == acc_t(0)) continue;
        rows[n] = f + bag.f_off + r * L.fs_n;
        ws[n] = wr;
        if (++n == 8) {
          cpu::axpy_rows_any(blk, rows, ws, 8, D);
          n = 0;
          if ((live += 8) >= kPoolBlock) flush();
        }
      }
      if (n) {
        cpu::axpy_rows_any(blk, rows, ws, n, D);
        live += n;
      }
    } else {
      for (int64_t r = c.r0; r < c.r1; ++r) {
        const scalar_t* row = f + bag.f_off + r * L.fs_n;
        bool any = false;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t wr = w[bag.w_off + r * K + k];
          if (wr == acc_t(0)) continue;
          cpu::axpy_rows_any(blk + k * D, &row, &wr, 1, D);
          any = true;
        }
        if (any && ++live >= kPoolBlock) flush();
      }
    }
    if (live) cascade.add_block(blk);
    if (!cascade.empty()) cascade.total(part);
    return;
  }
  // Features laid out with rows contiguous (e.g. channels-first [B,D,N] transposed to [B,N,D]):
  // every output element is a contiguous dot product over the chunk's rows.
  const int64_t n = c.r1 - c.r0;
  std::vector<acc_t> wcol(n);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t r = 0; r < n; ++r) wcol[r] = w[bag.w_off + (c.r0 + r) * K + k];
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* col = f + bag.f_off + d * L.fs_d + c.r0;
      // eight partial sums so the loop vectorises, over blocks of kSumBlock rows added pairwise;
      // padding (weight 0) is selected away, not multiplied, so NaN stored there stays out
      cpu::Cascade<acc_t> sum;
      for (int64_t b0 = 0; b0 < n; b0 += cpu::kSumBlock) {
        const int64_t b1 = std::min(n, b0 + cpu::kSumBlock);
        acc_t s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t r = b0;
        for (; r + 8 <= b1; r += 8) {
          for (int j = 0; j < 8; ++j) {
            const acc_t wj = wcol[r + j];
            s8[j] += wj != acc_t(0) ? wj * static_cast<acc_t>(col[r + j]) : acc_t(0);
          }
        }
        for (; r < b1; ++r) s8[0] += wcol[r] != acc_t(0) ? wcol[r] * static_cast<acc_t>(col[r]) : acc_t(0);
        sum.add(tree8(s8));
      }
      part[k * D + d] = sum.total();
    }
  }
}

// Bags and strides for the padded layout.
std::vector<Bag> padded_bags(const st::Tensor& logits, const st::Tensor& features, const st::Tensor& mask) {
  const int64_t B = features.size(0), N = features.size(1), K = logits.size(2);
  std::vector<Bag> bags(B);
  for (int64_t b = 0; b < B; ++b) {
    bags[b] = {N, b * features.stride(0), b * logits.stride(0), mask.defined() ? b * mask.stride(0) : 0,
               b * N * K};
  }
  return bags;
}

std::vector<Bag> packed_bags(const st::Tensor& logits, const st::Tensor& features,
                             const st::Tensor& offsets) {
  const int64_t B = offsets.size(0) - 1, K = logits.size(1);
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  std::vector<Bag> bags(B);
  for (int64_t b = 0; b < B; ++b) {
    bags[b] = {o[b + 1] - o[b], o[b] * features.stride(0), o[b] * logits.stride(0), 0, o[b] * K};
  }
  return bags;
}

// Features whose last dim is not unit-stride and whose row dim is not either are copied once;
// the two common layouts are read in place.
st::Tensor readable_features(const st::Tensor& f) {
  const int64_t nd = f.dim();
  if (f.stride(nd - 1) == 1 || f.stride(nd - 2) == 1 || f.numel() == 0) return f;
  return torch::stable::contiguous(f);
}

Layout make_layout(const st::Tensor& logits, const st::Tensor& features, const st::Tensor& mask) {
  const int64_t nd = features.dim();
  Layout L;
  L.K = logits.size(-1);
  L.D = features.size(-1);
  L.ls_n = logits.stride(-2);
  L.ls_k = logits.stride(-1);
  L.fs_n = features.stride(nd - 2);
  L.fs_d = features.stride(nd - 1);
  // A [B,N] layout whose rows are all size 1 may report any stride; the kernels only need
  // fs_d == 1 to mean "rows are contiguous", so normalise D == 1 to that.
  if (L.D == 1) L.fs_d = 1;
  L.ms_n = mask.defined() ? mask.stride(1) : 0;
  return L;
}

// weights: [rows, K] in the logits' dtype; pooled: [B, K, D] in the features' dtype. With squeeze_k
// (K == 1) both are allocated without their K dim, [rows] and [B, D]: the same memory, and an op
// output that is a view cannot be modified in place under autograd (pooled += bias), so every output
// is a tensor of its own.
std::tuple<st::Tensor, st::Tensor> pool_forward(const st::Tensor& logits, const st::Tensor& features,
                                                const st::Tensor& mask, const std::vector<Bag>& bags,
                                                bool squeeze_k) {
  const Layout L = make_layout(logits, features, mask);
  const int64_t B = static_cast<int64_t>(bags.size()), K = L.K, D = L.D;
  const st::Device dev = features.device();
  st::View ws = st::View::of(logits);
  if (squeeze_k) ws = ws.drop(ws.ndim - 1);
  st::Tensor weights = st::empty(ws.size, ws.ndim, logits.scalar_type(), dev);
  st::Tensor pooled = squeeze_k ? st::zeros({B, D}, features.scalar_type(), dev)
                                : st::zeros({B, K, D}, features.scalar_type(), dev);
  const st::ScalarType acc_type = st::acc_dtype(features.scalar_type());
  // The features pass reads weights in the accumulation type; for float/double that is the output.
  const bool separate = acc_type != logits.scalar_type();
  st::Tensor w_acc = separate ? st::empty(ws.size, ws.ndim, acc_type, dev) : weights;
  if (weights.numel() == 0) return {pooled, weights};

  // A generic lambda outside the dispatch macro: a top-level comma in its body would split the
  // macro's arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    acc_t* w = w_acc.mutable_data_ptr<acc_t>();
    bag_softmax<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(),
                                 mask.defined() ? mask.const_data_ptr<bool>() : nullptr, bags, L, w);
    if (D == 0) return;
    std::vector<int64_t> first;
    const auto chunks = make_chunks(bags, first);
    std::vector<acc_t> parts(chunks.size() * K * D);
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const int64_t nc_all = static_cast<int64_t>(chunks.size());
    torch::stable::parallel_for(
        0, nc_all, grain_for(total_rows(bags) * K * D, nc_all), [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            pool_chunk(f, w, bags[chunks[c].bag], chunks[c], L, parts.data() + c * K * D);
          }
        });
    // Chunks are summed pairwise in a fixed order: results do not depend on the thread
    // schedule. A bag without rows has no chunk and keeps its zeros.
    scalar_t* out = pooled.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B * K, grain_for(nc_all * D, std::max<int64_t>(1, B)),
                                [&](int64_t i0, int64_t i1) {
                                  for (int64_t i = i0; i < i1; ++i) {
                                    const int64_t b = i / K, k = i % K, nc = first[b + 1] - first[b];
                                    if (nc == 0) continue;
                                    acc_t* p0 = parts.data() + (first[b] * K + k) * D;
                                    cpu::pairwise_reduce_inplace(p0, nc, K * D, D);
                                    for (int64_t d = 0; d < D; ++d)
                                      out[i * D + d] = static_cast<scalar_t>(p0[d]);
                                  }
                                });
  };
  THO_DISPATCH_V2(features.scalar_type(), "masked_attention_pool_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  if (separate) torch::stable::copy_(weights, w_acc);
  return {pooled, weights};
}

// grad_logits (like weights) and grad_features (contiguous, like features' shape); either may be
// skipped, and then nothing of its size is allocated or written.
std::tuple<st::Tensor, st::Tensor> pool_backward(const PoolGrads& g, const st::Tensor& features,
                                                 const std::vector<Bag>& bags, bool need_logits,
                                                 bool need_features) {
  const st::ScalarType acc_type = st::acc_dtype(features.scalar_type());
  const st::Tensor w_acc = acc_contiguous(g.weights, acc_type);
  const st::Tensor gp = acc_contiguous(g.grad_pooled, acc_type);
  const st::Tensor gw = g.grad_weights.defined() ? acc_contiguous(g.grad_weights, acc_type) : st::Tensor();
  Layout L = make_layout(g.weights, features, st::Tensor());
  const int64_t K = L.K, D = L.D;
  const st::Device dev = features.device();
  const st::ScalarType wt = g.weights.scalar_type(), ft = features.scalar_type();
  // grad_logits has the weights' shape as passed (without the K dim when they had none).
  st::View ws = st::View::of(g.weights);
  if (g.squeeze_k) ws = ws.drop(ws.ndim - 1);
  const st::View fs = st::View::of(features);
  st::Tensor grad_logits = need_logits ? st::zeros(ws.size, ws.ndim, wt, dev) : st::empty({0}, wt, dev);
  st::Tensor grad_features =
      need_features ? cpu::empty_large(fs.size, fs.ndim, ft, dev) : st::empty({0}, ft, dev);
  if (!need_logits && !need_features) return {grad_logits, grad_features};
  if (g.weights.numel() == 0) {
    // No weights (B, N or K is 0): every feature row has weight 0.
    if (need_features) torch::stable::fill_(grad_features, 0.0);
    return {grad_logits, grad_features};
  }

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    const acc_t* gpp = gp.const_data_ptr<acc_t>();
    const acc_t* gwp = gw.defined() ? gw.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    scalar_t* gf = need_features ? grad_features.mutable_data_ptr<scalar_t>() : nullptr;
    // gsum[row,k] = dL/dw[row,k] in total: the incoming weight gradient plus <grad_pooled, row>.
    std::vector<acc_t> gsum(need_logits ? w_acc.numel() : 0);
    std::vector<int64_t> first;
    const auto chunks = make_chunks(bags, first);
    const int64_t gf_row = D;  // grad_features is contiguous
    const int64_t nc_all = static_cast<int64_t>(chunks.size());
    torch::stable::parallel_for(
        0, nc_all, grain_for(total_rows(bags) * K * (D + 1), nc_all), [&](int64_t c0, int64_t c1) {
          std::vector<acc_t> col;
          for (int64_t ci = c0; ci < c1; ++ci) {
            const Chunk& c = chunks[ci];
            const Bag& bag = bags[c.bag];
            const acc_t* gpb = gpp + c.bag * K * D;
            // grad_features rows are contiguous [rows, D]; the row index is the bag's row base.
            const int64_t row_base = bag.w_off / K;
            if (need_features) {
              for (int64_t r = c.r0; r < c.r1; ++r) {
                scalar_t* out = gf + (row_base + r) * gf_row;
                const acc_t* wr = w + bag.w_off + r * K;
                if (K == 1) {
                  const acc_t a = wr[0];
                  if (a == acc_t(0)) {
                    std::fill(out, out + D, scalar_t(0));
                  } else {
                    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(a * gpb[d]);
                  }
                } else {
                  // Branches whose weight is 0 are selected away, not multiplied: 0 * inf in
                  // grad_pooled would otherwise reach the row (padding: every branch is 0).
                  for (int64_t d = 0; d < D; ++d) {
                    acc_t s = 0;
                    for (int64_t k = 0; k < K; ++k)
                      s += wr[k] != acc_t(0) ? wr[k] * gpb[k * D + d] : acc_t(0);
                    out[d] = static_cast<scalar_t>(s);
                  }
                }
              }
            }
            if (!need_logits) continue;
            acc_t* gs = gsum.data() + bag.w_off;
            if (L.fs_d == 1 && K == 1) {
              // live rows (weight != 0) four at a time; padding rows are never read
              const scalar_t* rows[4];
              int64_t idx[4];
              acc_t out[4];
              int n = 0;
              for (int64_t r = c.r0; r < c.r1; ++r) {
                gs[r] = acc_t(0);
                if (w[bag.w_off + r] == acc_t(0)) continue;
                rows[n] = f + bag.f_off + r * L.fs_n;
                idx[n] = r;
                if (++n == 4) {
                  cpu::dot_rows_any(gpb, rows, 4, D, out);
                  for (int j = 0; j < 4; ++j) gs[idx[j]] = out[j];
                  n = 0;
                }
              }
              cpu::dot_rows_any(gpb, rows, n, D, out);
              for (int j = 0; j < n; ++j) gs[idx[j]] = out[j];
            } else if (L.fs_d == 1) {
              for (int64_t r = c.r0; r < c.r1; ++r) {
                const scalar_t* row = f + bag.f_off + r * L.fs_n;
                for (int64_t k = 0; k < K; ++k) {
                  const int64_t i = r * K + k;
                  gs[i] = w[bag.w_off + i] != acc_t(0) ? cpu::dot_any(gpb + k * D, row, D) : acc_t(0);
                }
              }
            } else {
              // Rows contiguous: accumulate the dot products column by column, vectorised over rows.
              const int64_t n = c.r1 - c.r0;
              col.assign(n * K, acc_t(0));
              for (int64_t d = 0; d < D; ++d) {
                const scalar_t* fc = f + bag.f_off + d * L.fs_d + c.r0;
                for (int64_t k = 0; k < K; ++k) {
                  const acc_t gd = gpb[k * D + d];
                  acc_t* ck = col.data() + k * n;
                  for (int64_t r = 0; r < n; ++r) ck[r] += gd * static_cast<acc_t>(fc[r]);
                }
              }
              for (int64_t r = 0; r < n; ++r) {
                for (int64_t k = 0; k < K; ++k) {
                  const int64_t i = (c.r0 + r) * K + k;
                  gs[i] = w[bag.w_off + i] != acc_t(0) ? col[k * n + r] : acc_t(0);
                }
              }
            }
          }
        });
    if (!need_logits) return;
    // Softmax backward per bag and branch: dl = w * (g - sum(w * g)).
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    const int64_t nb = static_cast<int64_t>(bags.size());
    torch::stable::parallel_for(0, nb, grain_for(total_rows(bags) * K, nb), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const Bag& bag = bags[b];
        for (int64_t k = 0; k < K; ++k) {
          // sum(w * g) over a long bag: blocks of eight running sums, added pairwise
          cpu::Cascade<acc_t> csum;
          for (int64_t r0 = 0; r0 < bag.len; r0 += cpu::kSumBlock) {
            const int64_t r1 = std::min(bag.len, r0 + cpu::kSumBlock);
            acc_t s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t i = bag.w_off + r * K + k;
              if (w[i] != acc_t(0)) {
                gsum[i] += gwp ? gwp[i] : acc_t(0);
                s8[(r - r0) & 7] += w[i] * gsum[i];
              }
            }
            csum.add(tree8(s8));
          }
          const acc_t c = csum.total();
          for (int64_t r = 0; r < bag.len; ++r) {
            const int64_t i = bag.w_off + r * K + k;
            gl[i] = w[i] != acc_t(0) ? static_cast<scalar_t>(w[i] * (gsum[i] - c)) : scalar_t(0);
          }
        }
      }
    });
  };
  THO_DISPATCH_V2(features.scalar_type(), "masked_attention_pool_backward_cpu",
                  AT_WRAP([&] { body(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return {grad_logits, grad_features};
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_cpu(const st::Tensor& logits,
                                                             const st::Tensor& features,
                                                             const std::optional<st::Tensor>& mask) {
  PoolInputs in = check_pool_inputs(logits, features, mask);
  const st::Tensor f = readable_features(in.features);
  return pool_forward(in.logits, f, in.mask, padded_bags(in.logits, f, in.mask), in.squeeze_k);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_backward_cpu(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& weights,
    const st::Tensor& features, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  PoolGrads g = check_pool_grads(grad_pooled, grad_weights, weights, features, std::nullopt);
  const st::Tensor f = readable_features(features);
  return pool_backward(g, f, padded_bags(g.weights, f, st::Tensor()), output_mask[0], output_mask[1]);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_packed_cpu(const st::Tensor& logits,
                                                                    const st::Tensor& features,
                                                                    const st::Tensor& offsets) {
  PackedInputs in = check_packed_inputs(logits, features, offsets);
  const st::Tensor f = readable_features(in.features);
  return pool_forward(in.logits, f, st::Tensor(), packed_bags(in.logits, f, in.offsets), in.squeeze_k);
}

std::tuple<st::Tensor, st::Tensor> masked_attention_pool_packed_backward_cpu(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights, const st::Tensor& weights,
    const st::Tensor& features, const st::Tensor& offsets, std::vector<bool> output_mask) {
  st::check_output_mask(output_mask);
  PoolGrads g = check_pool_grads(grad_pooled, grad_weights, weights, features, offsets);
  const st::Tensor f = readable_features(features);
  return pool_backward(g, f, packed_bags(g.weights, f, g.offsets), output_mask[0], output_mask[1]);
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("masked_attention_pool", TORCH_BOX(&maskattn::masked_attention_pool_cpu));
  m.impl("_masked_attention_pool_backward", TORCH_BOX(&maskattn::masked_attention_pool_backward_cpu));
  m.impl("masked_attention_pool_packed", TORCH_BOX(&maskattn::masked_attention_pool_packed_cpu));
  m.impl("_masked_attention_pool_packed_backward",
         TORCH_BOX(&maskattn::masked_attention_pool_packed_backward_cpu));
}
