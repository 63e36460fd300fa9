// CPU row kernels of scaled_cross_attention.
//
// Few keys (the few-shot case: ~5 prototypes): one pass per query row computes its norm and all
// Lk dot products together (keys stay in L1), the softmax, and the output row; the backward pass
// likewise recomputes the row's logits, forms the softmax gradient and writes grad_query in the
// same visit. Keys/values are converted to the accumulation type once (they are Lk rows); query
// and grad rows of half types are widened into a per-thread row buffer.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/cpu_vec.h"
#include "common/stable.h"
#include "scaled_cross_attention.h"

namespace maskattn {
namespace {

// out[j] = <x, rows_j> for the Lk contiguous rows of `rows`, four rows per pass over x (the
// FMA-cloned loops of common/cpu_vec); *sq = <x, x> if sq.
template <typename T>
void dots_all(const T* x, const T* rows, int64_t Lk, int64_t D, T* out, T* sq) {
  for (int64_t j = 0; j < Lk; j += 4) {
    const T* r[4];
    const int nk = static_cast<int>(std::min<int64_t>(4, Lk - j));
    for (int t = 0; t < nk; ++t) r[t] = rows + (j + t) * D;
    cpu::dot_rows_any(x, r, nk, D, out + j);
  }
  if (sq) *sq = cpu::dot_any(x, x, D);
}

// out[d] += sum_j w[j] * rows_j[d] over the rows whose weight is nonzero (masked keys, and keys
// whose weight underflowed, cost nothing and cannot leak a NaN stored in their value row).
template <typename T>
void axpy_all(T* out, const T* w, const T* rows, int64_t Lk, int64_t D) {
  const T* r[8];
  T a[8];
  int n = 0;
  for (int64_t j = 0; j < Lk; ++j) {
    if (w[j] == T(0)) continue;
    r[n] = rows + j * D;
    a[n] = w[j];
    if (++n == 8) {
      cpu::axpy_rows_any(out, r, a, n, D);
      n = 0;
    }
  }
  if (n) cpu::axpy_rows_any(out, r, a, n, D);
}

// A row of `src` in the accumulation type: the row itself for float/double, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* acc_row(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<acc_t>(src[d]);
    return buf.data();
  }
}

// Where an output row is accumulated: in place for float/double, else in buf (then stored).
template <typename scalar_t, typename acc_t>
inline acc_t* acc_out_row(scalar_t* dst, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
  }
}

// Softmax of logits[0..Lk) in place; -inf marks masked keys; no valid key gives all zeros.
template <typename acc_t>
inline void softmax_row(acc_t* l, int64_t Lk) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = ninf;
  bool nan = false;
  for (int64_t j = 0; j < Lk; ++j) {
    m = l[j] > m ? l[j] : m;
    nan = nan || l[j] != l[j];
  }
  if (nan || m == -ninf) {
    // A NaN or +inf logit among the valid keys: NaN row, as torch.softmax gives; masked keys
    // (and -inf logits) stay exactly 0, as the CUDA kernels give.
    for (int64_t j = 0; j < Lk; ++j) l[j] = l[j] == ninf ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (m == ninf) {
    std::fill(l, l + Lk, acc_t(0));
    return;
  }
  // blocks added pairwise (common/cascade_sum.h): rows of many keys stay accurate
  cpu::BlockedSum<acc_t> sum;
  for (int64_t j = 0; j < Lk; ++j) {
    const acc_t e = l[j] == ninf ? acc_t(0) : cpu::exp_diff(l[j], m);
    l[j] = e;
    sum.add(e);
  }
  const acc_t inv = acc_t(1) / sum.total();
  for (int64_t j = 0; j < Lk; ++j) l[j] *= inv;
}

template <typename acc_t>
inline acc_t inv_norm(acc_t n) {
  return acc_t(1) / std::max(n, static_cast<acc_t>(kXattnNormEps));
}

// torch.clamp(s, max=max_scale) in s's dtype: the cap is rounded to that dtype, NaN stays NaN.
template <typename T>
inline T clamp_in(T s, double max_scale) {
  const T m = static_cast<T>(max_scale);
  return static_cast<double>(s) > static_cast<double>(m) ? m : s;
}

// min(exp(lsl), max_scale) exactly as the eager composition computes it: ATen's exp (the one
// boxed call of a forward), the clamp in lsl's dtype, read on the host.
double cpu_scale(const XattnArgs& a, double max_scale) {
  const st::Tensor& e = xattn_lsl_exp(a);
  double r = 0;
  dispatch_floating(e.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    r = static_cast<double>(clamp_in<T>(*e.const_data_ptr<T>(), max_scale));
  });
  return r;
}

// Keys / values [N, Lk, D] (contiguous) in the accumulation type: the tensor's own data for
// float / double, else widened into buf (they are few rows: the one-pass path has Lk <= 8).
template <typename scalar_t, typename acc_t>
const acc_t* acc_rows(const st::Tensor& t, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return t.const_data_ptr<acc_t>();
  } else {
    const int64_t n = t.numel();
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf.data();
  }
}

int64_t row_grain(int64_t per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row));
}

// 1 / max(|k_j|, eps) per key (all ones without normalize).
template <typename acc_t>
std::vector<acc_t> key_inv_norms(const st::Tensor& knrm, int64_t n) {
  std::vector<acc_t> kinv(n, acc_t(1));
  if (knrm.defined()) {
    const acc_t* kn = knrm.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) kinv[i] = inv_norm(kn[i]);
  }
  return kinv;
}

st::Tensor row_norms_cpu(const st::Tensor& x) {
  const int64_t N = x.size(0), M = x.size(1), D = x.size(2);
  st::Tensor out = st::empty({N * M}, st::acc_dtype(x.scalar_type()), x.device());
  if (N * M == 0) return out;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    torch::stable::parallel_for(0, N * M, row_grain(D), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : D);
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* row = acc_row<scalar_t, acc_t>(xp + (r / M) * s0 + (r % M) * s1, D, buf);
        o[r] = std::sqrt(cpu::dot_any(row, row, D));
      }
    });
  });
  return out;
}

void fused_forward_cpu(const XattnArgs& a, const st::Tensor& knrm, double max_scale, bool normalize,
                       const st::Tensor& out, const st::Tensor& attn) {
  const double c_d = cpu_scale(a, max_scale);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = a.B * a.Lq;
    const int64_t Bk = a.k.size(0), Bv = a.v.size(0), Bm = a.mask.defined() ? a.mask.size(0) : 0;
    const acc_t c = static_cast<acc_t>(c_d);
    const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
    std::vector<acc_t> kbuf, vbuf;
    const acc_t* K = acc_rows<scalar_t, acc_t>(a.k, kbuf);
    const acc_t* Vp = acc_rows<scalar_t, acc_t>(a.v, vbuf);
    const bool* M = a.mask.defined() ? a.mask.const_data_ptr<bool>() : nullptr;
    const scalar_t* Q = a.q.const_data_ptr<scalar_t>();
    const int64_t qs0 = a.q.stride(0), qs1 = a.q.stride(1);
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    scalar_t* A = attn.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, R, row_grain(Lk * (D + Dv)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> qbuf(same ? 0 : D), obuf(same ? 0 : Dv), l(Lk);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / Lq, i = r % Lq;
        const int64_t kb = Bk == 1 ? 0 : b, vb = Bv == 1 ? 0 : b, mb = Bm == 1 ? 0 : b;
        const acc_t* q = acc_row<scalar_t, acc_t>(Q + b * qs0 + i * qs1, D, qbuf);
        acc_t sq = 0;
        dots_all<acc_t>(q, K + kb * Lk * D, Lk, D, l.data(), normalize ? &sq : nullptr);
        const acc_t qinv = normalize ? inv_norm(std::sqrt(sq)) : acc_t(1);
        for (int64_t j = 0; j < Lk; ++j) {
          const bool valid = M == nullptr || M[mb * Lk + j];
          l[j] = valid ? c * (l[j] * qinv * kinv[kb * Lk + j]) : -std::numeric_limits<acc_t>::infinity();
        }
        softmax_row(l.data(), Lk);
        for (int64_t j = 0; j < Lk; ++j) A[r * Lk + j] = static_cast<scalar_t>(l[j]);
        acc_t* o = acc_out_row<scalar_t, acc_t>(O + r * Dv, obuf);
        std::fill(o, o + Dv, acc_t(0));
        axpy_all<acc_t>(o, l.data(), Vp + vb * Lk * Dv, Lk, Dv);
        store_row<scalar_t, acc_t>(o, O + r * Dv, Dv);
      }
    });
  });
}

void softmax_forward_cpu(const XattnArgs& a, const st::Tensor& S, const st::Tensor& qnrm,
                         const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& attn) {
  const double c_d = cpu_scale(a, max_scale);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const int64_t Lq = a.Lq, Lk = a.Lk, R = a.B * a.Lq;
    const int64_t Bk = a.k.size(0), Bm = a.mask.defined() ? a.mask.size(0) : 0;
    const acc_t c = static_cast<acc_t>(c_d);
    const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
    const acc_t* QN = normalize ? qnrm.const_data_ptr<acc_t>() : nullptr;
    const bool* M = a.mask.defined() ? a.mask.const_data_ptr<bool>() : nullptr;
    const acc_t* Sp = S.const_data_ptr<acc_t>();  // raw dots in the accumulation type
    scalar_t* A = attn.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, R, row_grain(Lk * 8), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> l(Lk);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / Lq, kb = Bk == 1 ? 0 : b, mb = Bm == 1 ? 0 : b;
        const acc_t qinv = QN ? inv_norm(QN[r]) : acc_t(1);
        for (int64_t j = 0; j < Lk; ++j) {
          const bool valid = M == nullptr || M[mb * Lk + j];
          l[j] = valid ? c * (Sp[r * Lk + j] * qinv * kinv[kb * Lk + j])
                       : -std::numeric_limits<acc_t>::infinity();
        }
        softmax_row(l.data(), Lk);
        for (int64_t j = 0; j < Lk; ++j) A[r * Lk + j] = static_cast<scalar_t>(l[j]);
      }
    });
  });
}

// Softmax backward of one row given its cosines and dA = d loss / d attn: writes wqk (d loss /
// d <q, k_j> of the raw vectors) and p (dlogit * cos); returns sum_j p_j.
//
// The softmax gradient sums to zero in exact arithmetic but not in floating point; the eager
// composition's row-max subtraction sends minus that sum to the arg-max key, and so do we.
// Without it the scale's gradient, sum_ij dlogit_ij * cos_ij, picks up (sum_j dlogit_ij) * cos
// per row: a 0.3% error in float32 at the few-shot shape (100 queries, 5 prototypes, D = 640).
template <typename acc_t>
inline acc_t softmax_backward_row(const acc_t* cos, const acc_t* dA, const acc_t* w, int64_t Lk, acc_t c,
                                  acc_t qinv, const acc_t* kinv, acc_t* wqk, acc_t* p) {
  cpu::BlockedSum<acc_t> ws;
  int64_t jm = -1;
  for (int64_t j = 0; j < Lk; ++j) {
    if (w[j] == acc_t(0)) continue;
    ws.add(w[j] * dA[j]);
    if (jm < 0 || w[j] > w[jm]) jm = j;
  }
  const acc_t s = ws.total();
  cpu::BlockedSum<acc_t> dsum;
  for (int64_t j = 0; j < Lk; ++j) {
    p[j] = w[j] != acc_t(0) ? w[j] * (dA[j] - s) : acc_t(0);  // p holds dlogit for now
    dsum.add(p[j]);
  }
  if (jm >= 0) p[jm] -= dsum.total();
  cpu::BlockedSum<acc_t> psum;
  for (int64_t j = 0; j < Lk; ++j) {
    const acc_t ds = p[j];
    p[j] = ds * cos[j];
    psum.add(p[j]);
    wqk[j] = c * ds * qinv * kinv[j];
  }
  return psum.total();
}

void fused_backward_cpu(const XattnArgs& a, const st::Tensor& knrm, const st::Tensor& gout,
                        const st::Tensor& gattn, const st::Tensor& attn, double max_scale, bool normalize,
                        const st::Tensor& dq, const st::Tensor& wqk, const st::Tensor& p) {
  const double c_d = cpu_scale(a, max_scale);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = a.B * a.Lq;
    const int64_t Bk = a.k.size(0), Bv = a.v.size(0);
    const acc_t c = static_cast<acc_t>(c_d);
    const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
    std::vector<acc_t> kbuf, vbuf;
    const acc_t* K = acc_rows<scalar_t, acc_t>(a.k, kbuf);
    const acc_t* Vp = acc_rows<scalar_t, acc_t>(a.v, vbuf);
    const scalar_t* Q = a.q.const_data_ptr<scalar_t>();
    const int64_t qs0 = a.q.stride(0), qs1 = a.q.stride(1);
    const scalar_t* G = gout.const_data_ptr<scalar_t>();
    const scalar_t* GA = gattn.defined() ? gattn.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* A = attn.const_data_ptr<scalar_t>();
    scalar_t* DQ = dq.defined() ? dq.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* WQK = wqk.mutable_data_ptr<acc_t>();
    acc_t* P = p.mutable_data_ptr<acc_t>();
    torch::stable::parallel_for(0, R, row_grain(Lk * (2 * D + Dv)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> qbuf(same ? 0 : D), gbuf(same ? 0 : Dv), obuf(same ? 0 : D), cos(Lk), dA(Lk), w(Lk);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / Lq, i = r % Lq;
        const int64_t kb = Bk == 1 ? 0 : b, vb = Bv == 1 ? 0 : b;
        const acc_t* q = acc_row<scalar_t, acc_t>(Q + b * qs0 + i * qs1, D, qbuf);
        acc_t sq = 0;
        dots_all<acc_t>(q, K + kb * Lk * D, Lk, D, cos.data(), normalize ? &sq : nullptr);
        const acc_t qn = std::sqrt(sq);
        const acc_t qinv = normalize ? inv_norm(qn) : acc_t(1);
        const acc_t* ki = kinv.data() + kb * Lk;
        for (int64_t j = 0; j < Lk; ++j) cos[j] *= qinv * ki[j];
        const acc_t* g = acc_row<scalar_t, acc_t>(G + r * Dv, Dv, gbuf);
        dots_all<acc_t>(g, Vp + vb * Lk * Dv, Lk, Dv, dA.data(), nullptr);
        for (int64_t j = 0; j < Lk; ++j) {
          if (GA) dA[j] += static_cast<acc_t>(GA[r * Lk + j]);
          w[j] = static_cast<acc_t>(A[r * Lk + j]);
        }
        const acc_t psum =
            softmax_backward_row(cos.data(), dA.data(), w.data(), Lk, c, qinv, ki, WQK + r * Lk, P + r * Lk);
        if (!DQ) continue;
        // grad_query = sum_j wqk_j k_j - q * (F.normalize's projection term, zero where the
        // norm was clamped to eps).
        const acc_t rc =
            normalize && qn >= static_cast<acc_t>(kXattnNormEps) ? qinv * qinv * c * psum : acc_t(0);
        acc_t* o = acc_out_row<scalar_t, acc_t>(DQ + r * D, obuf);
        for (int64_t d = 0; d < D; ++d) o[d] = -rc * q[d];
        axpy_all<acc_t>(o, WQK + r * Lk, K + kb * Lk * D, Lk, D);
        store_row<scalar_t, acc_t>(o, DQ + r * D, D);
      }
    });
  });
}

void softmax_backward_cpu(const XattnArgs& a, const st::Tensor& S, const st::Tensor& dAt,
                          const st::Tensor& gattn, const st::Tensor& attn, const st::Tensor& qnrm,
                          const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& wqk,
                          const st::Tensor& p, const st::Tensor& rowcoef) {
  const double c_d = cpu_scale(a, max_scale);
  dispatch_floating(a.q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const int64_t Lq = a.Lq, Lk = a.Lk, R = a.B * a.Lq;
    const int64_t Bk = a.k.size(0);
    const acc_t c = static_cast<acc_t>(c_d);
    const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
    const acc_t* QN = normalize ? qnrm.const_data_ptr<acc_t>() : nullptr;
    const acc_t* Sp = S.const_data_ptr<acc_t>();  // raw dots in the accumulation type
    const acc_t* DAp = dAt.const_data_ptr<acc_t>();
    const scalar_t* GA = gattn.defined() ? gattn.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* A = attn.const_data_ptr<scalar_t>();
    acc_t* WQK = wqk.mutable_data_ptr<acc_t>();
    acc_t* P = p.mutable_data_ptr<acc_t>();
    acc_t* RC = rowcoef.mutable_data_ptr<acc_t>();
    torch::stable::parallel_for(0, R, row_grain(Lk * 8), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> cos(Lk), dA(Lk), w(Lk);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t kb = Bk == 1 ? 0 : r / Lq;
        const acc_t qn = QN ? QN[r] : acc_t(1);
        const acc_t qinv = QN ? inv_norm(qn) : acc_t(1);
        const acc_t* ki = kinv.data() + kb * Lk;
        for (int64_t j = 0; j < Lk; ++j) {
          cos[j] = Sp[r * Lk + j] * qinv * ki[j];
          dA[j] = DAp[r * Lk + j] + (GA ? static_cast<acc_t>(GA[r * Lk + j]) : acc_t(0));
          w[j] = static_cast<acc_t>(A[r * Lk + j]);
        }
        const acc_t psum =
            softmax_backward_row(cos.data(), dA.data(), w.data(), Lk, c, qinv, ki, WQK + r * Lk, P + r * Lk);
        RC[r] = normalize && qn >= static_cast<acc_t>(kXattnNormEps) ? qinv * qinv * c * psum : acc_t(0);
      }
    });
  });
}

// A weight of exactly zero (+0 or -0; NaN is not zero). Half types by their bits, so that the scan
// over attn vectorises.
template <typename T>
inline bool is_zero(T x) {
  if constexpr (sizeof(T) == 2) {
    uint16_t b;
    std::memcpy(&b, &x, 2);
    return (b & 0x7fff) == 0;
  } else {
    return x == T(0);
  }
}

template <typename T>
inline bool is_finite(T x) {
  return std::isfinite(static_cast<double>(x));
}

// Elements of attn per unit of the scans below; between units a found zero stops the search.
constexpr int64_t kScanChunk = 16384;

bool may_have_dead_rows_cpu(const st::Tensor& attn) {
  const int64_t n = attn.numel();
  std::atomic<bool> found{false};
  dispatch_floating(attn.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* w = attn.const_data_ptr<scalar_t>();
    const int64_t nch = (n + kScanChunk - 1) / kScanChunk;
    torch::stable::parallel_for(0, nch, 2, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1 && !found.load(std::memory_order_relaxed); ++c) {
        const int64_t e = std::min(n, (c + 1) * kScanChunk);
        bool z = false;
        for (int64_t i = c * kScanChunk; i < e; ++i) z |= is_zero(w[i]);
        if (z) found.store(true, std::memory_order_relaxed);
      }
    });
  });
  return found.load();
}

st::Tensor cleared_values_cpu(const XattnArgs& a, const st::Tensor& attn, st::ScalarType out_dt) {
  const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, Dv = a.Dv, Bv = a.v.size(0);
  // dead[b * Lk + j]: no row of sample b weighs key j. Units of (sample, 256 keys) scan their Lq rows.
  std::vector<uint8_t> dead(B * Lk, 1);
  constexpr int64_t kKeysPerUnit = 256;
  const int64_t kunits = (Lk + kKeysPerUnit - 1) / kKeysPerUnit;
  dispatch_floating(attn.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* w = attn.const_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B * kunits, row_grain(Lq * std::min(Lk, kKeysPerUnit)),
                                [&](int64_t u0, int64_t u1) {
                                  for (int64_t u = u0; u < u1; ++u) {
                                    const int64_t b = u / kunits, j0 = (u % kunits) * kKeysPerUnit;
                                    const int64_t j1 = std::min(Lk, j0 + kKeysPerUnit);
                                    uint8_t* d = dead.data() + b * Lk;
                                    for (int64_t i = 0; i < Lq; ++i) {
                                      const scalar_t* row = w + (b * Lq + i) * Lk;
                                      for (int64_t j = j0; j < j1; ++j) d[j] &= is_zero(row[j]) ? 1 : 0;
                                    }
                                  }
                                });
  });
  // Which rows to clear per output sample: per sample when v is, else (shared v, B > 1) where the
  // row is dead for every sample, unless a row dead for some samples only holds a non-finite value.
  bool per_sample = Bv != 1 || B == 1;
  std::vector<uint8_t> dead_all;
  if (!per_sample) {
    dead_all.assign(Lk, 1);
    std::vector<uint8_t> partly(Lk, 0);
    for (int64_t j = 0; j < Lk; ++j) {
      bool all = true, any = false;
      for (int64_t b = 0; b < B; ++b) {
        all = all && dead[b * Lk + j];
        any = any || dead[b * Lk + j];
      }
      dead_all[j] = all;
      partly[j] = any && !all;
    }
    dispatch_floating(a.v.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* v = a.v.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < Lk && !per_sample; ++j) {
        if (!partly[j]) continue;
        for (int64_t d = 0; d < Dv; ++d) {
          if (!is_finite(v[j * Dv + d])) {
            per_sample = true;
            break;
          }
        }
      }
    });
  }
  const int64_t Bo = per_sample ? B : 1;
  st::Tensor out = st::empty({Bo, Lk, Dv}, out_dt, a.v.device());
  const uint8_t* dd = per_sample ? dead.data() : dead_all.data();
  dispatch_floating(a.v.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const auto run = [&](auto otag) {
      using out_t = decltype(otag);
      const scalar_t* v = a.v.const_data_ptr<scalar_t>();
      out_t* o = out.mutable_data_ptr<out_t>();
      torch::stable::parallel_for(0, Bo * Lk, row_grain(Dv), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t b = n / Lk, j = n % Lk;
          const scalar_t* src = v + ((Bv == 1 ? 0 : b) * Lk + j) * Dv;
          out_t* dst = o + n * Dv;
          if (dd[n]) {
            std::fill(dst, dst + Dv, out_t(0));
          } else {
            for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<out_t>(src[d]);
          }
        }
      });
    };
    if (out_dt == a.v.scalar_type()) {
      run(scalar_t{});
    } else {
      MASKATTN_CHECK(out_dt == st::acc_dtype(a.v.scalar_type()),
                     "scaled_cross_attention: internal error: values in ",
                     torch::headeronly::toString(out_dt));
      run(acc_t{});
    }
  });
  return out;
}

st::Tensor finite_keys_cpu(const st::Tensor& x) {
  st::Tensor out = st::empty({x.size(0), x.size(1), x.size(2)}, x.scalar_type(), x.device());
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = is_finite(src[i]) ? src[i] : scalar_t(0);
    });
  });
  return out;
}

// out[d] = g[d] - x[d] * c, rounded once (a fused multiply-add) or twice. The eager composition's
// addcmul_ rounds once where ATen runs its AVX2 / AVX-512 kernels (the multiply-add there is
// contracted into an FMA) and twice in its default kernel; the rows follow it bit for bit.
#if defined(__GNUC__) && defined(__x86_64__)
#define MASKATTN_FMA_TARGET __attribute__((target("avx2,fma")))
#define MASKATTN_HAS_FMA_TARGET 1
#else
#define MASKATTN_FMA_TARGET
#define MASKATTN_HAS_FMA_TARGET 0
#endif

MASKATTN_FMA_TARGET void fms_row_fused(const float* g, const float* x, float c, float* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = __builtin_fmaf(-x[d], c, g[d]);
}

MASKATTN_FMA_TARGET void fms_row_fused(const double* g, const double* x, double c, double* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = __builtin_fma(-x[d], c, g[d]);
}

template <typename T>
void fms_row_plain(const T* g, const T* x, T c, T* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = g[d] - x[d] * c;
}

// Whether ATen's CPU kernels are its AVX2 / AVX-512 ones (the CPU has AVX2 and FMA, and
// ATEN_CPU_CAPABILITY does not ask for the default kernels).
bool aten_uses_fma() {
  static const bool fused = [] {
#if MASKATTN_HAS_FMA_TARGET
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return fused;
}

st::Tensor minus_product_cpu(const st::Tensor& g, const st::Tensor& x, const st::Tensor& coef) {
  const int64_t M = x.size(1), D = x.size(2), rows = x.size(0) * M;
  const auto gs = g.sizes();
  st::Tensor out = st::empty(gs.data(), static_cast<int64_t>(gs.size()), x.scalar_type(), x.device());
  // The CPU runs its GEMMs in the accumulation type (gemm_in_acc).
  MASKATTN_CHECK(g.scalar_type() == st::acc_dtype(x.scalar_type()),
                 "scaled_cross_attention: internal error: GEMM result in ", st::dtype_str(g));
  const bool fused = aten_uses_fma();
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const acc_t* G = g.const_data_ptr<acc_t>();
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    const acc_t* C = coef.const_data_ptr<acc_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    torch::stable::parallel_for(0, rows, row_grain(D), [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> xbuf(same ? 0 : D), obuf(same ? 0 : D);
      for (int64_t n = n0; n < n1; ++n) {
        const acc_t* xr = acc_row<scalar_t, acc_t>(X + (n / M) * s0 + (n % M) * s1, D, xbuf);
        acc_t* o = acc_out_row<scalar_t, acc_t>(O + n * D, obuf);
        if (fused) {
          fms_row_fused(G + n * D, xr, C[n], o, D);
        } else {
          fms_row_plain(G + n * D, xr, C[n], o, D);
        }
        store_row<scalar_t, acc_t>(o, O + n * D, D);
      }
    });
  });
  return out;
}

st::Tensor key_coef_cpu(const XattnArgs& a, const st::Tensor& colsum, const st::Tensor& knrm,
                        double max_scale) {
  const int64_t n = a.k.size(0) * a.Lk;
  const double c_d = cpu_scale(a, max_scale);
  st::Tensor coef = st::empty({n}, colsum.scalar_type(), colsum.device());
  dispatch_acc(colsum.scalar_type(), [&](auto tag) {
    using acc_t = decltype(tag);
    const acc_t* CS = colsum.const_data_ptr<acc_t>();
    const acc_t* KN = knrm.const_data_ptr<acc_t>();
    acc_t* out = coef.mutable_data_ptr<acc_t>();
    const acc_t c = static_cast<acc_t>(c_d);
    const acc_t eps = static_cast<acc_t>(kXattnNormEps);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t kn = KN[i];
      const acc_t kinv = acc_t(1) / std::max(kn, eps);
      out[i] = kn >= eps ? kinv * kinv * c * CS[i] : acc_t(0);
    }
  });
  return coef;
}

st::Tensor scale_grad_cpu(const XattnArgs& a, const st::Tensor& psum, double max_scale) {
  const st::Tensor& e = xattn_lsl_exp(a);
  st::Tensor ds = st::empty({}, e.scalar_type(), e.device());
  dispatch_acc(psum.scalar_type(), [&](auto ptag) {
    using acc_t = decltype(ptag);
    const acc_t total = *psum.const_data_ptr<acc_t>();
    dispatch_floating(e.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using opmath_t = st::acc_t<T>;
      const T s = *e.const_data_ptr<T>();
      const T dc = static_cast<T>(total);
      const bool passes = static_cast<double>(s) <= static_cast<double>(static_cast<T>(max_scale));
      *ds.mutable_data_ptr<T>() =
          passes ? static_cast<T>(static_cast<opmath_t>(dc) * static_cast<opmath_t>(s)) : T(0);
    });
  });
  return ds;
}

// Above this many keys the CPU uses BLAS GEMMs around the fused softmax. Measured at B=8, Lq=300,
// D=640 float32 on 2 EPYC cores: the one-pass rows win up to Lk = 8 (fwd+bwd 4.1 vs 7.3 ms at
// Lk = 5), are even at 16 and lose the forward from there on (1.6 vs 1.2 ms at 16, 2.8 vs 1.8 at 32),
// where the GEMMs' register blocking over keys pays off.
constexpr int64_t kCpuMaxFusedKeys = 8;

const XattnKernels& cpu_kernels() {
  static const XattnKernels k{kCpuMaxFusedKeys,        &row_norms_cpu,      &fused_forward_cpu,
                              &softmax_forward_cpu,    &fused_backward_cpu, &softmax_backward_cpu,
                              &may_have_dead_rows_cpu, &cleared_values_cpu, &finite_keys_cpu,
                              &minus_product_cpu,      &key_coef_cpu,       &scale_grad_cpu,
                              [] { return true; },
                              /*gemm_in_acc=*/true};
  return k;
}

std::tuple<st::Tensor, st::Tensor> scaled_cross_attention_cpu(const st::Tensor& query, const st::Tensor& key,
                                                              const st::Tensor& value, const st::Tensor& lsl,
                                                              double max_scale,
                                                              const std::optional<st::Tensor>& key_mask,
                                                              bool normalize) {
  return xattn_forward(query, key, value, lsl, max_scale, key_mask, normalize, cpu_kernels());
}

std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor> scaled_cross_attention_backward_cpu(
    const st::Tensor& grad_out, const std::optional<st::Tensor>& grad_attn, const st::Tensor& query,
    const st::Tensor& key, const st::Tensor& value, const st::Tensor& lsl, const st::Tensor& attn,
    double max_scale, bool normalize, std::vector<bool> output_mask) {
  return xattn_backward(grad_out, grad_attn, query, key, value, lsl, attn, max_scale, normalize, output_mask,
                        cpu_kernels());
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("scaled_cross_attention", TORCH_BOX(&maskattn::scaled_cross_attention_cpu));
  m.impl("_scaled_cross_attention_backward", TORCH_BOX(&maskattn::scaled_cross_attention_backward_cpu));
}
