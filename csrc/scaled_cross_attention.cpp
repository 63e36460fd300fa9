// Schema of scaled_cross_attention, the argument checks every backend runs first, and the
// device-agnostic driver: which path (one-pass row kernels or GEMMs around a fused softmax) and
// the reductions over query rows, which are GEMMs and sums over small [R, Lk] tensors.
#include "scaled_cross_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/checks.h"

namespace maskattn {

XattnArgs check_xattn_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& lsl, double max_scale,
                             const std::optional<at::Tensor>& key_mask, const char* op, bool copy_rows) {
  TORCH_CHECK(query.dim() == 2 || query.dim() == 3, op, ": query must be [B, Lq, D] or [B, D], got shape ",
              shape_str(query));
  TORCH_CHECK(key.dim() == 2 || key.dim() == 3, op,
              ": key must be [B, Lk, D] or [Lk, D] (shared), got shape ", shape_str(key));
  TORCH_CHECK(value.dim() == 2 || value.dim() == 3, op,
              ": value must be [B, Lk, Dv] or [Lk, Dv] (shared), got shape ", shape_str(value));
  check_floating(query, op, "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
              ": query (", query.scalar_type(), "), key (", key.scalar_type(), ") and value (",
              value.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(lsl.dim() == 0, op, ": logit_scale_log must be a 0-dim tensor, got shape ", shape_str(lsl));
  check_floating(lsl, op, "logit_scale_log");
  TORCH_CHECK(!std::isnan(max_scale) && max_scale > 0, op,
              ": max_scale must be positive (inf = no cap), got ", max_scale);
  check_same_device(key, op, "key", query, "query");
  check_same_device(value, op, "value", query, "query");
  check_same_device(lsl, op, "logit_scale_log", query, "query");

  XattnArgs a;
  a.q2d = query.dim() == 2;
  a.k2d = key.dim() == 2;
  a.v2d = value.dim() == 2;
  at::Tensor q = a.q2d ? query.unsqueeze(1) : query;
  at::Tensor k = a.k2d ? key.unsqueeze(0) : key;
  at::Tensor v = a.v2d ? value.unsqueeze(0) : value;
  a.B = q.size(0);
  a.Lq = q.size(1);
  a.D = q.size(2);
  a.Lk = k.size(1);
  a.Dv = v.size(2);
  TORCH_CHECK(k.size(2) == a.D, op, ": key ", shape_str(key), " and query ", shape_str(query),
              " must have the same feature size D");
  TORCH_CHECK(k.size(0) == a.B || a.k2d, op, ": key ", shape_str(key), " must have batch size B = ", a.B,
              " of query ", shape_str(query), " (or be [Lk, D], shared by the batch)");
  TORCH_CHECK(v.size(1) == a.Lk, op, ": value ", shape_str(value), " must have Lk = ", a.Lk,
              " rows, one per key of key ", shape_str(key));
  TORCH_CHECK(v.size(0) == a.B || a.v2d, op, ": value ", shape_str(value), " must have batch size B = ", a.B,
              " of query ", shape_str(query), " (or be [Lk, Dv], shared by the batch)");
  a.q = q;
  a.k = k;
  a.v = v;
  a.lsl = lsl;
  if (key_mask.has_value() && key_mask->defined()) {
    const auto& m = *key_mask;
    const bool ok =
        (m.dim() == 1 && m.size(0) == a.Lk) || (m.dim() == 2 && m.size(0) == a.B && m.size(1) == a.Lk);
    TORCH_CHECK(ok, op, ": key_mask must be [B, Lk] = [", a.B, ", ", a.Lk, "] or [Lk] = [", a.Lk,
                "] to match query ", shape_str(query), " and key ", shape_str(key), ", got shape ",
                shape_str(m));
    check_same_device(m, op, "key_mask", query, "query");
    check_mask_dtype(m, op, "key_mask");
    at::Tensor mb = as_bool_mask(m);
    a.mask = (m.dim() == 1 ? mb.unsqueeze(0) : mb).contiguous();
  }
  if (copy_rows) copy_rows_readable(a);
  return a;
}

void copy_rows_readable(XattnArgs& a) {
  // Rows are read with unit stride along the features; anything else is copied once.
  if (!(a.q.stride(2) == 1 || a.D <= 1)) a.q = a.q.contiguous();
  a.k = a.k.contiguous();
  a.v = a.v.contiguous();
}

namespace {

// A GEMM operand, in the accumulation type where the backend runs its GEMMs there.
at::Tensor gemm_in(const at::Tensor& t, const XattnKernels& kern) {
  const auto acc = at::toOpMathType(t.scalar_type());
  return kern.gemm_in_acc && acc != t.scalar_type() ? t.to(acc) : t;
}

// q [B, Lq, D] and k [Bk, Lk, D] as GEMM operands (gemm_in) -> S [B * Lq, Lk].
at::Tensor raw_dots(const at::Tensor& q, const at::Tensor& k) {
  const int64_t R = q.size(0) * q.size(1), Lk = k.size(1);
  // Shared prototypes fold the whole batch into one GEMM.
  if (k.size(0) == 1) return at::matmul(q, k[0].t()).reshape({R, Lk});
  return at::bmm(q, k.transpose(1, 2)).reshape({R, Lk});
}

// The values for attn @ v with every row that no query of its sample weighs (masked keys, -inf
// logits) set to zero, so that a NaN or inf stored there cannot reach the GEMM result through
// 0 * NaN. A shared v ([1, Lk, Dv]) read by B > 1 samples can only be cleared in place where a row
// is dead for every sample; a row dead for some samples only would still leak into those. If such
// a row holds a non-finite value, v becomes a per-sample copy [B, Lk, Dv] cleared per sample.
// Finding out reads one flag back from the device. On CUDA that is a sync, paid only when the
// mask differs per sample (rows dead for some samples only otherwise need non-finite logits as
// well), and while a CUDA graph is being captured the copy is made without asking.
at::Tensor cleared_values(const XattnArgs& a, const at::Tensor& attn, const XattnKernels& kern) {
  const at::Tensor dead = attn.reshape({a.B, a.Lq, a.Lk}).ne(0).any(1).logical_not();  // [B, Lk]
  const at::Tensor zero = at::zeros({}, a.v.options());
  if (a.v.size(0) != 1 || a.B == 1) return at::where(dead.unsqueeze(-1), zero, a.v);
  const at::Tensor dead_all = dead.all(0);  // [Lk]
  const bool per_sample_mask = a.mask.defined() && a.mask.size(0) > 1;
  bool copy = false;
  if (attn.is_cpu() || per_sample_mask) {
    copy = true;
    if (kern.may_sync()) {
      const at::Tensor partly = dead.any(0).logical_and(dead_all.logical_not());
      copy = partly.logical_and(a.v[0].isfinite().all(-1).logical_not()).any().item<bool>();
    }
  }
  if (!copy) return at::where(dead_all.view({1, -1, 1}), zero, a.v);
  return at::where(dead.unsqueeze(-1), zero, a.v.expand({a.B, a.Lk, a.Dv}));
}

// Whether there can be dead keys to clear: on the CPU a zero weight is looked for first (a
// cheap pass over attn, no sync to speak of) so that unmasked calls pay nothing; on CUDA that
// check would be a host sync, so the rows are cleared unconditionally there.
bool may_have_dead_rows(const at::Tensor& attn) {
  return !attn.is_cpu() || attn.eq(0).any().item<bool>();
}

// g - x * coef in the accumulation type, in one pass and in place where g (a fresh GEMM result) is
// already of that type; back in g's dtype.
at::Tensor minus_product(const at::Tensor& g, const at::Tensor& x, const at::Tensor& coef,
                         at::ScalarType acc) {
  at::Tensor r = g.to(acc);
  r.addcmul_(x, coef, -1);
  return r.to(g.scalar_type());
}

// A cap above the largest finite value of logit_scale_log's dtype caps nothing, and clamp_max
// refuses a scalar that its dtype cannot hold (1e300 for float32): such a cap becomes inf, which
// every floating dtype holds and which gives the same scale.
double effective_max_scale(const at::Tensor& lsl, double max_scale) {
  double largest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lsl.scalar_type(), "xattn_max_scale", [&] {
    largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return max_scale > largest ? std::numeric_limits<double>::infinity() : max_scale;
}

// A freshly computed result in the given shape, as a tensor of its own rather than a view: an op
// output that is a view cannot be modified in place under autograd (out += x).
at::Tensor in_shape(const at::Tensor& t, at::IntArrayRef sizes) {
  return t.sizes() == sizes ? t : at::_unsafe_view(t.contiguous(), sizes);
}

// min(exp(lsl), max_scale) as a device tensor, computed exactly as the eager composition does.
at::Tensor clamped_scale(const at::Tensor& lsl, double max_scale) {
  return lsl.exp().clamp_max(max_scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> xattn_forward(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const at::Tensor& lsl,
                                                 double max_scale, const std::optional<at::Tensor>& key_mask,
                                                 bool normalize, const XattnKernels& kern) {
  XattnArgs a = check_xattn_inputs(query, key, value, lsl, max_scale, key_mask, "scaled_cross_attention");
  max_scale = effective_max_scale(lsl, max_scale);
  const int64_t R = a.B * a.Lq;
  at::Tensor out = at::empty({R, a.Dv}, a.q.options());
  at::Tensor attn = at::empty({R, a.Lk}, a.q.options());
  if (R > 0 && a.Lk == 0) {
    out.zero_();  // no key at all: every query has no valid key
  } else if (R > 0) {
    const at::Tensor knrm = normalize ? kern.row_norms(a.k) : at::Tensor();
    if (a.Lk <= kern.max_fused_keys) {
      kern.fused_forward(a, knrm, max_scale, normalize, out, attn);
    } else {
      const at::Tensor S = raw_dots(gemm_in(a.q, kern), gemm_in(a.k, kern));
      const at::Tensor qnrm = normalize ? kern.row_norms(a.q) : at::Tensor();
      kern.softmax_forward(a, S, qnrm, knrm, max_scale, normalize, attn);
      const at::Tensor v = gemm_in(may_have_dead_rows(attn) ? cleared_values(a, attn, kern) : a.v, kern);
      const at::Tensor w = gemm_in(attn, kern);
      if (v.scalar_type() != out.scalar_type()) {
        out.copy_(v.size(0) == 1 ? at::mm(w, v[0]) : at::bmm(w.view({a.B, a.Lq, a.Lk}), v).view({R, a.Dv}));
      } else if (v.size(0) == 1) {
        at::mm_out(out, w, v[0]);
      } else {
        at::Tensor out3 = out.view({a.B, a.Lq, a.Dv});
        at::bmm_out(out3, w.view({a.B, a.Lq, a.Lk}), v);
      }
    }
  }
  if (a.q2d) return {in_shape(out, {a.B, a.Dv}), in_shape(attn, {a.B, a.Lk})};
  return {in_shape(out, {a.B, a.Lq, a.Dv}), in_shape(attn, {a.B, a.Lq, a.Lk})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xattn_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& lsl, const at::Tensor& attn,
    double max_scale, bool normalize, std::array<bool, 4> output_mask, const XattnKernels& kern) {
  const char* op = "_scaled_cross_attention_backward";
  // The copies wait for the checks of the gradients: a bad grad_out must be refused before a
  // zero-stride value of 2^40 rows is made contiguous.
  XattnArgs a = check_xattn_inputs(query, key, value, lsl, max_scale, std::nullopt, op, /*copy_rows=*/false);
  max_scale = effective_max_scale(lsl, max_scale);
  const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = B * Lq;
  std::vector<int64_t> out_shape = a.q2d ? std::vector<int64_t>{B, Dv} : std::vector<int64_t>{B, Lq, Dv};
  std::vector<int64_t> attn_shape = a.q2d ? std::vector<int64_t>{B, Lk} : std::vector<int64_t>{B, Lq, Lk};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), op, ": grad_out has shape ",
              shape_str(grad_out), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK(attn.sizes() == at::IntArrayRef(attn_shape), op, ": attn has shape ", shape_str(attn),
              ", expected ", at::IntArrayRef(attn_shape));
  // out and attn are the forward's outputs, in the query's dtype
  check_same_dtype(grad_out, op, "grad_out", query, "query");
  check_same_dtype(attn, op, "attn", query, "query");
  check_same_device(grad_out, op, "grad_out", query, "query");
  check_same_device(attn, op, "attn", query, "query");
  at::Tensor gattn;
  if (grad_attn.has_value() && grad_attn->defined()) {
    TORCH_CHECK(grad_attn->sizes() == attn.sizes(), op, ": grad_attn ", shape_str(*grad_attn),
                " must match attn ", shape_str(attn));
    check_same_dtype(*grad_attn, op, "grad_attn", attn, "attn");
    check_same_device(*grad_attn, op, "grad_attn", query, "query");
    gattn = grad_attn->reshape({R, Lk}).contiguous();
  }
  copy_rows_readable(a);
  const auto [need_q, need_k, need_v, need_s] = output_mask;
  const auto dt = query.scalar_type();
  const auto acc = at::toOpMathType(dt);
  // opcheck feeds expanded (zero-stride) gradients; the kernels want plain rows.
  const at::Tensor gout = grad_out.reshape({R, Dv}).contiguous();
  const at::Tensor A = attn.reshape({R, Lk}).contiguous();
  if (R > 0 && Lk > 0 && may_have_dead_rows(A)) {
    // A key no query row weighs (masked, -inf logit) must not leak NaN / inf from its content into
    // any gradient through a 0 * NaN in the GEMMs, the norms or the row kernels. Zeroing every
    // non-finite key entry is exact: a key with non-finite content that a row does weigh gives
    // that row a NaN or +inf logit, so the row's weights, and every gradient they reach, are NaN
    // whatever the key holds. It needs no per-sample view, so shared keys are handled as they are.
    // Values need nothing: they enter the backward only through dA = gout v^T, which the softmax
    // backward reads only where the weight is nonzero.
    a.k = at::where(a.k.isfinite(), a.k, at::zeros({}, a.k.options()));
  }

  at::Tensor dq = at::empty({0}, query.options()), dk = at::empty({0}, key.options()),
             dv = at::empty({0}, value.options()), ds = at::empty({0}, lsl.options());
  if (R == 0 || Lk == 0) {
    if (need_q) dq = at::zeros(query.sizes(), query.options());
    if (need_k) dk = at::zeros(key.sizes(), key.options());
    if (need_v) dv = at::zeros(value.sizes(), value.options());
    if (need_s) ds = at::zeros_like(lsl);
    return {dq, dk, dv, ds};
  }
  const at::Tensor Aw = gemm_in(A, kern), goutw = gemm_in(gout, kern);
  if (need_v) {
    if (a.v.size(0) == 1) {
      dv = in_shape(at::mm(Aw.t(), goutw).to(dt), value.sizes());
    } else {
      dv = in_shape(at::bmm(Aw.view({B, Lq, Lk}).transpose(1, 2), goutw.view({B, Lq, Dv})).to(dt),
                    value.sizes());
    }
  }
  if (!(need_q || need_k || need_s)) return {dq, dk, dv, ds};

  const at::Tensor knrm = normalize ? kern.row_norms(a.k) : at::Tensor();
  at::Tensor wqk = at::empty({R, Lk}, a.q.options().dtype(acc));
  at::Tensor p = at::empty({R, Lk}, a.q.options().dtype(acc));
  at::Tensor kk = a.k.size(0) == 1 ? a.k[0] : a.k;  // [Lk, D] shared or [B, Lk, D]
  // GEMM operands, widened once: q for the GEMM path and grad_key, k for the GEMM path.
  const bool gemm_path = Lk > kern.max_fused_keys;
  const at::Tensor qw = gemm_path || need_k ? gemm_in(a.q, kern) : at::Tensor();
  const at::Tensor kw = gemm_path ? gemm_in(a.k, kern) : at::Tensor();
  // d loss / d <q_i, k_j> as a GEMM operand (acc already; the input dtype for cuBLAS).
  const auto wqk_in = [&] { return kern.gemm_in_acc ? wqk : wqk.to(dt); };
  if (!gemm_path) {
    at::Tensor dq_rows = need_q ? at::empty({R, D}, a.q.options()) : at::Tensor();
    kern.fused_backward(a, knrm, gout, gattn, A, max_scale, normalize, dq_rows, wqk, p);
    if (need_q) dq = in_shape(dq_rows, query.sizes());
  } else {
    const at::Tensor S = raw_dots(qw, kw);
    const at::Tensor vw = gemm_in(a.v, kern);
    const at::Tensor dA = vw.size(0) == 1
                              ? at::mm(goutw, vw[0].t())
                              : at::bmm(goutw.view({B, Lq, Dv}), vw.transpose(1, 2)).reshape({R, Lk});
    const at::Tensor qnrm = normalize ? kern.row_norms(a.q) : at::Tensor();
    at::Tensor rowcoef = at::empty({R}, a.q.options().dtype(acc));
    kern.softmax_backward(a, S, dA, gattn, A, qnrm, knrm, max_scale, normalize, wqk, p, rowcoef);
    if (need_q) {
      const at::Tensor w = wqk_in().view({B, Lq, Lk});
      at::Tensor g = kw.size(0) == 1 ? at::matmul(w, kw[0]) : at::bmm(w, kw);
      if (normalize) g = minus_product(g, a.q, rowcoef.view({B, Lq, 1}), acc);
      dq = in_shape(g.to(dt), query.sizes());
    }
  }
  if (need_k) {
    const at::Tensor w = wqk_in();
    at::Tensor g;
    if (a.k.size(0) == 1) {
      g = at::mm(w.t(), qw.reshape({R, D}));  // [Lk, D]
    } else {
      g = at::bmm(w.view({B, Lq, Lk}).transpose(1, 2), qw);  // [B, Lk, D]
    }
    if (normalize) {
      // Projection term of F.normalize's backward, only where the norm was not clamped to eps:
      // dk_j -= k_j / |k_j|^2 * scale * sum_i dlogit_ij cos_ij.
      const at::Tensor colsum = a.k.size(0) == 1 ? p.sum(0) : p.view({B, Lq, Lk}).sum(1);
      const at::Tensor kn = knrm.view(colsum.sizes());
      const at::Tensor kinv = kn.clamp_min(kXattnNormEps).reciprocal();
      const at::Tensor c = clamped_scale(lsl, max_scale).to(acc);
      const at::Tensor coef =
          at::where(kn >= kXattnNormEps, kinv * kinv * c * colsum, at::zeros_like(colsum));
      g = minus_product(g, kk, coef.unsqueeze(-1), acc);
    }
    dk = in_shape(g.to(dt), key.sizes());
  }
  if (need_s) {
    // d scale / d lsl = exp(lsl), and torch.clamp passes the gradient only where exp(lsl) <= max.
    const at::Tensor s = lsl.exp();
    const at::Tensor dc = p.sum().to(lsl.scalar_type());
    ds = at::where(s <= max_scale, dc * s, at::zeros_like(s));
  }
  return {dq, dk, dv, ds};
}

}  // namespace maskattn

TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "scaled_cross_attention(Tensor query, Tensor key, Tensor value, Tensor logit_scale_log, "
      "float max_scale=100.0, Tensor? key_mask=None, bool normalize=False) -> (Tensor, Tensor)");
  m.def(
      "_scaled_cross_attention_backward(Tensor grad_out, Tensor? grad_attn, Tensor query, Tensor key, "
      "Tensor value, Tensor logit_scale_log, Tensor attn, float max_scale, bool normalize, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
