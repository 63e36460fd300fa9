// CPU row kernels of scaled_cross_attention.
//
// Few keys (the few-shot case: ~5 prototypes): one pass per query row computes its norm and all
// Lk dot products together (keys stay in L1), the softmax, and the output row; the backward pass
// likewise recomputes the row's logits, forms the softmax gradient and writes grad_query in the
// same visit. Keys/values are converted to the accumulation type once (they are Lk rows); query
// and grad rows of half types are widened into a per-thread row buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/checks.h"
#include "common/cpu_vec.h"
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

// min(exp(lsl), max_scale) exactly as the eager composition computes it (in lsl's dtype).
double cpu_scale(const at::Tensor& lsl, double max_scale) {
  return lsl.exp().clamp_max(max_scale).item<double>();
}

int64_t row_grain(int64_t per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row));
}

// 1 / max(|k_j|, eps) per key (all ones without normalize).
template <typename acc_t>
std::vector<acc_t> key_inv_norms(const at::Tensor& knrm, int64_t n) {
  std::vector<acc_t> kinv(n, acc_t(1));
  if (knrm.defined()) {
    const acc_t* kn = knrm.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) kinv[i] = inv_norm(kn[i]);
  }
  return kinv;
}

at::Tensor row_norms_cpu(const at::Tensor& x) {
  const int64_t N = x.size(0), M = x.size(1), D = x.size(2);
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty({N * M}, x.options().dtype(acc));
  if (N * M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xattn_row_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    at::parallel_for(0, N * M, row_grain(D), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : D);
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* row = acc_row<scalar_t, acc_t>(xp + (r / M) * s0 + (r % M) * s1, D, buf);
        o[r] = std::sqrt(cpu::dot_any(row, row, D));
      }
    });
  });
  return out;
}

void fused_forward_cpu(const XattnArgs& a, const at::Tensor& knrm, double max_scale, bool normalize,
                       const at::Tensor& out, const at::Tensor& attn) {
  const double c_d = cpu_scale(a.lsl, max_scale);
  const auto acc = at::toOpMathType(a.q.scalar_type());
  const at::Tensor kf = a.k.to(acc).contiguous(), vf = a.v.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool same = std::is_same_v<scalar_t, acc_t>;
        const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = a.B * a.Lq;
        const int64_t Bk = a.k.size(0), Bv = a.v.size(0), Bm = a.mask.defined() ? a.mask.size(0) : 0;
        const acc_t c = static_cast<acc_t>(c_d);
        const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
        const acc_t* K = kf.const_data_ptr<acc_t>();
        const acc_t* Vp = vf.const_data_ptr<acc_t>();
        const bool* M = a.mask.defined() ? a.mask.const_data_ptr<bool>() : nullptr;
        const scalar_t* Q = a.q.const_data_ptr<scalar_t>();
        const int64_t qs0 = a.q.stride(0), qs1 = a.q.stride(1);
        scalar_t* O = out.data_ptr<scalar_t>();
        scalar_t* A = attn.data_ptr<scalar_t>();
        at::parallel_for(0, R, row_grain(Lk * (D + Dv)), [&](int64_t r0, int64_t r1) {
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

void softmax_forward_cpu(const XattnArgs& a, const at::Tensor& S, const at::Tensor& qnrm,
                         const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& attn) {
  const double c_d = cpu_scale(a.lsl, max_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_softmax_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t Lq = a.Lq, Lk = a.Lk, R = a.B * a.Lq;
        const int64_t Bk = a.k.size(0), Bm = a.mask.defined() ? a.mask.size(0) : 0;
        const acc_t c = static_cast<acc_t>(c_d);
        const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
        const acc_t* QN = normalize ? qnrm.const_data_ptr<acc_t>() : nullptr;
        const bool* M = a.mask.defined() ? a.mask.const_data_ptr<bool>() : nullptr;
        const acc_t* Sp = S.const_data_ptr<acc_t>();  // raw dots in the accumulation type
        scalar_t* A = attn.data_ptr<scalar_t>();
        at::parallel_for(0, R, row_grain(Lk * 8), [&](int64_t r0, int64_t r1) {
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

void fused_backward_cpu(const XattnArgs& a, const at::Tensor& knrm, const at::Tensor& gout,
                        const at::Tensor& gattn, const at::Tensor& attn, double max_scale, bool normalize,
                        const at::Tensor& dq, const at::Tensor& wqk, const at::Tensor& p) {
  const double c_d = cpu_scale(a.lsl, max_scale);
  const auto acc = at::toOpMathType(a.q.scalar_type());
  const at::Tensor kf = a.k.to(acc).contiguous(), vf = a.v.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool same = std::is_same_v<scalar_t, acc_t>;
        const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = a.B * a.Lq;
        const int64_t Bk = a.k.size(0), Bv = a.v.size(0);
        const acc_t c = static_cast<acc_t>(c_d);
        const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
        const acc_t* K = kf.const_data_ptr<acc_t>();
        const acc_t* Vp = vf.const_data_ptr<acc_t>();
        const scalar_t* Q = a.q.const_data_ptr<scalar_t>();
        const int64_t qs0 = a.q.stride(0), qs1 = a.q.stride(1);
        const scalar_t* G = gout.const_data_ptr<scalar_t>();
        const scalar_t* GA = gattn.defined() ? gattn.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* A = attn.const_data_ptr<scalar_t>();
        scalar_t* DQ = dq.defined() ? dq.data_ptr<scalar_t>() : nullptr;
        acc_t* WQK = wqk.data_ptr<acc_t>();
        acc_t* P = p.data_ptr<acc_t>();
        at::parallel_for(0, R, row_grain(Lk * (2 * D + Dv)), [&](int64_t r0, int64_t r1) {
          std::vector<acc_t> qbuf(same ? 0 : D), gbuf(same ? 0 : Dv), obuf(same ? 0 : D), cos(Lk), dA(Lk),
              w(Lk);
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
            const acc_t psum = softmax_backward_row(cos.data(), dA.data(), w.data(), Lk, c, qinv, ki,
                                                    WQK + r * Lk, P + r * Lk);
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

void softmax_backward_cpu(const XattnArgs& a, const at::Tensor& S, const at::Tensor& dAt,
                          const at::Tensor& gattn, const at::Tensor& attn, const at::Tensor& qnrm,
                          const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& wqk,
                          const at::Tensor& p, const at::Tensor& rowcoef) {
  const double c_d = cpu_scale(a.lsl, max_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.q.scalar_type(), "scaled_cross_attention_softmax_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t Lq = a.Lq, Lk = a.Lk, R = a.B * a.Lq;
        const int64_t Bk = a.k.size(0);
        const acc_t c = static_cast<acc_t>(c_d);
        const std::vector<acc_t> kinv = key_inv_norms<acc_t>(knrm, Bk * Lk);
        const acc_t* QN = normalize ? qnrm.const_data_ptr<acc_t>() : nullptr;
        const acc_t* Sp = S.const_data_ptr<acc_t>();  // raw dots in the accumulation type
        const acc_t* DAp = dAt.const_data_ptr<acc_t>();
        const scalar_t* GA = gattn.defined() ? gattn.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* A = attn.const_data_ptr<scalar_t>();
        acc_t* WQK = wqk.data_ptr<acc_t>();
        acc_t* P = p.data_ptr<acc_t>();
        acc_t* RC = rowcoef.data_ptr<acc_t>();
        at::parallel_for(0, R, row_grain(Lk * 8), [&](int64_t r0, int64_t r1) {
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
            const acc_t psum = softmax_backward_row(cos.data(), dA.data(), w.data(), Lk, c, qinv, ki,
                                                    WQK + r * Lk, P + r * Lk);
            RC[r] = normalize && qn >= static_cast<acc_t>(kXattnNormEps) ? qinv * qinv * c * psum : acc_t(0);
          }
        });
      });
}

// Above this many keys the CPU uses BLAS GEMMs around the fused softmax. Measured at B=8, Lq=300,
// D=640 float32 on 2 EPYC cores: the one-pass rows win up to Lk = 8 (fwd+bwd 4.1 vs 7.3 ms at
// Lk = 5), are even at 16 and lose the forward from there on (1.6 vs 1.2 ms at 16, 2.8 vs 1.8 at 32),
// where the GEMMs' register blocking over keys pays off.
constexpr int64_t kCpuMaxFusedKeys = 8;

const XattnKernels& cpu_kernels() {
  static const XattnKernels k{kCpuMaxFusedKeys,     &row_norms_cpu,      &fused_forward_cpu,
                              &softmax_forward_cpu, &fused_backward_cpu, &softmax_backward_cpu,
                              [] { return true; },  /*gemm_in_acc=*/true};
  return k;
}

std::tuple<at::Tensor, at::Tensor> scaled_cross_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                              const at::Tensor& value, const at::Tensor& lsl,
                                                              double max_scale,
                                                              const std::optional<at::Tensor>& key_mask,
                                                              bool normalize) {
  return xattn_forward(query, key, value, lsl, max_scale, key_mask, normalize, cpu_kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_cross_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& lsl, const at::Tensor& attn,
    double max_scale, bool normalize, std::array<bool, 4> output_mask) {
  return xattn_backward(grad_out, grad_attn, query, key, value, lsl, attn, max_scale, normalize, output_mask,
                        cpu_kernels());
}

}  // namespace
}  // namespace maskattn

TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("scaled_cross_attention", &maskattn::scaled_cross_attention_cpu);
  m.impl("_scaled_cross_attention_backward", &maskattn::scaled_cross_attention_backward_cpu);
}
