// Schema of scaled_cross_attention, the argument checks every backend runs first, and the
// device-agnostic driver: which path (one-pass row kernels or GEMMs around a fused softmax) and
// the reductions over query rows, which are GEMMs and backend sums over small [R, Lk] tensors.
//
// The GEMMs and the two sums over p are ATen's (MKL / cuBLAS, ATen's reductions), called through
// the boxed dispatcher with Tensor arguments; everything elementwise between them is a backend
// kernel, because Scalar arguments cannot cross that boundary and each boxed call costs
// microseconds. Views are stride arithmetic.
#include "scaled_cross_attention.h"

#include <array>
#include <cmath>
#include <limits>

namespace maskattn {

namespace {

// An ATen op by name with Tensor arguments only (the stable ABI passes no Scalar through the
// dispatcher); its first result.
template <typename... Ts>
st::Tensor aten(const char* name, const char* overload, const Ts&... args) {
  std::array<StableIValue, sizeof...(Ts)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<st::Tensor>(stack[0]);
}

st::View contiguous_view(std::initializer_list<int64_t> sizes) {
  st::View v;
  v.ndim = static_cast<int>(sizes.size());
  int64_t s = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.size[d] = sizes.begin()[d];
    v.stride[d] = s;
    s *= v.size[d] > 1 ? v.size[d] : 1;
  }
  return v;
}

// t (contiguous) with other sizes of the same numel: one C call. The result is a tensor of its
// own, not a view in autograd's sense (as at::_unsafe_view), so an op output made this way can be
// modified in place under autograd.
st::Tensor reshaped(const st::Tensor& t, std::initializer_list<int64_t> sizes) {
  return st::as_strided(t, contiguous_view(sizes));
}

st::Tensor contig(const st::Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

// Tensor.select(0, 0) of a size-1 leading dim.
st::Tensor first(const st::Tensor& t) {
  return st::as_strided(t, st::View::of(t).drop(0));
}

// Tensor.transpose(d0, d1).
st::Tensor transposed(const st::Tensor& t, int d0, int d1) {
  st::View v = st::View::of(t);
  std::swap(v.size[d0], v.size[d1]);
  std::swap(v.stride[d0], v.stride[d1]);
  return st::as_strided(t, v);
}

st::Tensor to_dtype(const st::Tensor& t, st::ScalarType dt) {
  return t.scalar_type() == dt ? t : torch::stable::to(t, dt);
}

// A freshly computed result in the given sizes, as a tensor of its own rather than a view: an op
// output that is a view cannot be modified in place under autograd (out += x).
st::Tensor in_shape(const st::Tensor& t, const st::Tensor& like) {
  if (st::same_sizes(t, like)) return t;
  const st::Tensor c = contig(t);
  st::View v = st::View::of(like);
  int64_t s = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.stride[d] = s;
    s *= v.size[d] > 1 ? v.size[d] : 1;
  }
  return st::as_strided(c, v);
}

st::Tensor empty_like_sizes(const st::Tensor& like, st::ScalarType dt, const st::Device& dev) {
  const auto s = like.sizes();
  return st::empty(s.data(), static_cast<int64_t>(s.size()), dt, dev);
}

st::Tensor zeros_like_sizes(const st::Tensor& like) {
  const auto s = like.sizes();
  return st::zeros(s.data(), static_cast<int64_t>(s.size()), like.scalar_type(), like.device());
}

// A GEMM operand, in the accumulation type where the backend runs its GEMMs there.
st::Tensor gemm_in(const st::Tensor& t, const XattnKernels& kern) {
  return kern.gemm_in_acc ? to_dtype(t, st::acc_dtype(t.scalar_type())) : t;
}

// q [B, Lq, D] and k [Bk, Lk, D] as GEMM operands (gemm_in) -> S [B, Lq, Lk] contiguous, which the
// kernels read as [B * Lq, Lk].
st::Tensor raw_dots(const st::Tensor& q, const st::Tensor& k) {
  // Shared prototypes fold the whole batch into one GEMM.
  if (k.size(0) == 1) return contig(aten("aten::matmul", "", q, transposed(first(k), 0, 1)));
  return contig(aten("aten::bmm", "", q, transposed(k, 1, 2)));
}

// A cap above the largest finite value of logit_scale_log's dtype caps nothing, and clamp_max
// refuses a scalar that its dtype cannot hold (1e300 for float32): such a cap becomes inf, which
// every floating dtype holds and which gives the same scale.
double effective_max_scale(const st::Tensor& lsl, double max_scale) {
  double largest = 0;
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
  };
  THO_DISPATCH_V2(lsl.scalar_type(), "xattn_max_scale", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return max_scale > largest ? std::numeric_limits<double>::infinity() : max_scale;
}

}  // namespace

const st::Tensor& xattn_lsl_exp(const XattnArgs& a) {
  if (!a.lsl_exp.has_value()) a.lsl_exp = aten("aten::exp", "", a.lsl);
  return *a.lsl_exp;
}

XattnArgs check_xattn_inputs(const st::Tensor& query, const st::Tensor& key, const st::Tensor& value,
                             const st::Tensor& lsl, double max_scale,
                             const std::optional<st::Tensor>& key_mask, const char* op, bool copy_rows) {
  MASKATTN_CHECK(query.dim() == 2 || query.dim() == 3, op, ": query must be [B, Lq, D] or [B, D], got shape ",
                 st::shape_str(query));
  MASKATTN_CHECK(key.dim() == 2 || key.dim() == 3, op,
                 ": key must be [B, Lk, D] or [Lk, D] (shared), got shape ", st::shape_str(key));
  MASKATTN_CHECK(value.dim() == 2 || value.dim() == 3, op,
                 ": value must be [B, Lk, Dv] or [Lk, Dv] (shared), got shape ", st::shape_str(value));
  st::check_floating(query, op, "query");
  MASKATTN_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
                 ": query (", st::dtype_str(query), "), key (", st::dtype_str(key), ") and value (",
                 st::dtype_str(value), ") must have the same dtype");
  MASKATTN_CHECK(lsl.dim() == 0, op, ": logit_scale_log must be a 0-dim tensor, got shape ",
                 st::shape_str(lsl));
  st::check_floating(lsl, op, "logit_scale_log");
  MASKATTN_CHECK(!std::isnan(max_scale) && max_scale > 0, op,
                 ": max_scale must be positive (inf = no cap), got ", max_scale);
  st::check_same_device(key, op, "key", query, "query");
  st::check_same_device(value, op, "value", query, "query");
  st::check_same_device(lsl, op, "logit_scale_log", query, "query");

  XattnArgs a;
  a.q2d = query.dim() == 2;
  a.k2d = key.dim() == 2;
  a.v2d = value.dim() == 2;
  // unsqueeze as stride arithmetic: one C call each, no dispatcher
  const st::Tensor q = a.q2d ? st::as_strided(query, st::View::of(query).insert(1)) : query;
  const st::Tensor k = a.k2d ? st::as_strided(key, st::View::of(key).insert(0)) : key;
  const st::Tensor v = a.v2d ? st::as_strided(value, st::View::of(value).insert(0)) : value;
  a.B = q.size(0);
  a.Lq = q.size(1);
  a.D = q.size(2);
  a.Lk = k.size(1);
  a.Dv = v.size(2);
  MASKATTN_CHECK(k.size(2) == a.D, op, ": key ", st::shape_str(key), " and query ", st::shape_str(query),
                 " must have the same feature size D");
  MASKATTN_CHECK(k.size(0) == a.B || a.k2d, op, ": key ", st::shape_str(key),
                 " must have batch size B = ", a.B, " of query ", st::shape_str(query),
                 " (or be [Lk, D], shared by the batch)");
  MASKATTN_CHECK(v.size(1) == a.Lk, op, ": value ", st::shape_str(value), " must have Lk = ", a.Lk,
                 " rows, one per key of key ", st::shape_str(key));
  MASKATTN_CHECK(v.size(0) == a.B || a.v2d, op, ": value ", st::shape_str(value),
                 " must have batch size B = ", a.B, " of query ", st::shape_str(query),
                 " (or be [Lk, Dv], shared by the batch)");
  a.q = q;
  a.k = k;
  a.v = v;
  a.lsl = lsl;
  if (key_mask.has_value() && key_mask->defined()) {
    const auto& m = *key_mask;
    const bool ok =
        (m.dim() == 1 && m.size(0) == a.Lk) || (m.dim() == 2 && m.size(0) == a.B && m.size(1) == a.Lk);
    MASKATTN_CHECK(ok, op, ": key_mask must be [B, Lk] = [", a.B, ", ", a.Lk, "] or [Lk] = [", a.Lk,
                   "] to match query ", st::shape_str(query), " and key ", st::shape_str(key), ", got shape ",
                   st::shape_str(m));
    st::check_same_device(m, op, "key_mask", query, "query");
    st::check_mask_dtype(m, op, "key_mask");
    const st::Tensor mb = st::as_bool_mask(m);
    a.mask = contig(m.dim() == 1 ? st::as_strided(mb, st::View::of(mb).insert(0)) : mb);
  }
  if (copy_rows) copy_rows_readable(a);
  return a;
}

void copy_rows_readable(XattnArgs& a) {
  // Rows are read with unit stride along the features; anything else is copied once.
  if (!(a.q.stride(2) == 1 || a.D <= 1)) a.q = torch::stable::contiguous(a.q);
  a.k = contig(a.k);
  a.v = contig(a.v);
}

std::tuple<st::Tensor, st::Tensor> xattn_forward(const st::Tensor& query, const st::Tensor& key,
                                                 const st::Tensor& value, const st::Tensor& lsl,
                                                 double max_scale, const std::optional<st::Tensor>& key_mask,
                                                 bool normalize, const XattnKernels& kern) {
  XattnArgs a = check_xattn_inputs(query, key, value, lsl, max_scale, key_mask, "scaled_cross_attention");
  max_scale = effective_max_scale(lsl, max_scale);
  const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, Dv = a.Dv, R = B * Lq;
  const st::ScalarType dt = query.scalar_type();
  const st::Device dev = query.device();
  // Allocated in their final shapes; the kernels write them as [R, Dv] and [R, Lk].
  st::Tensor out = a.q2d ? st::empty({B, Dv}, dt, dev) : st::empty({B, Lq, Dv}, dt, dev);
  st::Tensor attn = a.q2d ? st::empty({B, Lk}, dt, dev) : st::empty({B, Lq, Lk}, dt, dev);
  if (R > 0 && Lk == 0) {
    torch::stable::fill_(out, 0.0);  // no key at all: every query has no valid key
  } else if (R > 0) {
    const st::Tensor knrm = normalize ? kern.row_norms(a.k) : st::Tensor();
    if (Lk <= kern.max_fused_keys) {
      kern.fused_forward(a, knrm, max_scale, normalize, out, attn);
    } else {
      const st::Tensor S = raw_dots(gemm_in(a.q, kern), gemm_in(a.k, kern));
      const st::Tensor qnrm = normalize ? kern.row_norms(a.q) : st::Tensor();
      kern.softmax_forward(a, S, qnrm, knrm, max_scale, normalize, attn);
      const st::ScalarType gemm_dt = kern.gemm_in_acc ? st::acc_dtype(dt) : dt;
      const st::Tensor v =
          kern.may_have_dead_rows(attn) ? kern.cleared_values(a, attn, gemm_dt) : gemm_in(a.v, kern);
      const st::Tensor w = gemm_in(attn, kern);
      if (v.scalar_type() != dt) {
        st::Tensor r = v.size(0) == 1 ? aten("aten::mm", "", reshaped(w, {R, Lk}), first(v))
                                      : aten("aten::bmm", "", reshaped(w, {B, Lq, Lk}), v);
        st::Tensor o = v.size(0) == 1 ? reshaped(out, {R, Dv}) : reshaped(out, {B, Lq, Dv});
        torch::stable::copy_(o, r);
      } else if (v.size(0) == 1) {
        aten("aten::mm", "out", reshaped(w, {R, Lk}), first(v), reshaped(out, {R, Dv}));
      } else {
        aten("aten::bmm", "out", reshaped(w, {B, Lq, Lk}), v, reshaped(out, {B, Lq, Dv}));
      }
    }
  }
  return {out, attn};
}

std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor> xattn_backward(
    const st::Tensor& grad_out, const std::optional<st::Tensor>& grad_attn, const st::Tensor& query,
    const st::Tensor& key, const st::Tensor& value, const st::Tensor& lsl, const st::Tensor& attn,
    double max_scale, bool normalize, const std::vector<bool>& output_mask, const XattnKernels& kern) {
  st::check_output_mask(output_mask, 4);
  const char* op = "_scaled_cross_attention_backward";
  // The copies wait for the checks of the gradients: a bad grad_out must be refused before a
  // zero-stride value of 2^40 rows is made contiguous.
  XattnArgs a = check_xattn_inputs(query, key, value, lsl, max_scale, std::nullopt, op, /*copy_rows=*/false);
  max_scale = effective_max_scale(lsl, max_scale);
  const int64_t B = a.B, Lq = a.Lq, Lk = a.Lk, D = a.D, Dv = a.Dv, R = B * Lq;
  const std::vector<int64_t> out_shape =
      a.q2d ? std::vector<int64_t>{B, Dv} : std::vector<int64_t>{B, Lq, Dv};
  const std::vector<int64_t> attn_shape =
      a.q2d ? std::vector<int64_t>{B, Lk} : std::vector<int64_t>{B, Lq, Lk};
  const auto has_sizes = [](const st::Tensor& t, const std::vector<int64_t>& s) {
    const auto ts = t.sizes();
    if (ts.size() != s.size()) return false;
    for (size_t i = 0; i < s.size(); ++i)
      if (ts[i] != s[i]) return false;
    return true;
  };
  const auto shape_of = [](const std::vector<int64_t>& s) {
    return st::sizes_str(s, static_cast<int64_t>(s.size()));
  };
  MASKATTN_CHECK(has_sizes(grad_out, out_shape), op, ": grad_out has shape ", st::shape_str(grad_out),
                 ", expected ", shape_of(out_shape));
  MASKATTN_CHECK(has_sizes(attn, attn_shape), op, ": attn has shape ", st::shape_str(attn), ", expected ",
                 shape_of(attn_shape));
  // out and attn are the forward's outputs, in the query's dtype
  st::check_same_dtype(grad_out, op, "grad_out", query, "query");
  st::check_same_dtype(attn, op, "attn", query, "query");
  st::check_same_device(grad_out, op, "grad_out", query, "query");
  st::check_same_device(attn, op, "attn", query, "query");
  st::Tensor gattn;
  if (grad_attn.has_value() && grad_attn->defined()) {
    MASKATTN_CHECK(st::same_sizes(*grad_attn, attn), op, ": grad_attn ", st::shape_str(*grad_attn),
                   " must match attn ", st::shape_str(attn));
    st::check_same_dtype(*grad_attn, op, "grad_attn", attn, "attn");
    st::check_same_device(*grad_attn, op, "grad_attn", query, "query");
    gattn = reshaped(contig(*grad_attn), {R, Lk});
  }
  copy_rows_readable(a);
  const bool need_q = output_mask[0], need_k = output_mask[1], need_v = output_mask[2],
             need_s = output_mask[3];
  const st::ScalarType dt = query.scalar_type();
  const st::ScalarType acc = st::acc_dtype(dt);
  const st::Device dev = query.device();
  // opcheck feeds expanded (zero-stride) gradients; the kernels want plain rows.
  const st::Tensor gout = reshaped(contig(grad_out), {R, Dv});
  const st::Tensor A = reshaped(contig(attn), {R, Lk});
  if (R > 0 && Lk > 0 && kern.may_have_dead_rows(A)) {
    // A key no query row weighs (masked, -inf logit) must not leak NaN / inf from its content into
    // any gradient through a 0 * NaN in the GEMMs, the norms or the row kernels. Zeroing every
    // non-finite key entry is exact: a key with non-finite content that a row does weigh gives
    // that row a NaN or +inf logit, so the row's weights, and every gradient they reach, are NaN
    // whatever the key holds. It needs no per-sample view, so shared keys are handled as they are.
    // Values need nothing: they enter the backward only through dA = gout v^T, which the softmax
    // backward reads only where the weight is nonzero.
    a.k = kern.finite_keys(a.k);
  }

  st::Tensor dq = st::empty({0}, dt, dev), dk = st::empty({0}, key.scalar_type(), dev),
             dv = st::empty({0}, value.scalar_type(), dev), ds = st::empty({0}, lsl.scalar_type(), dev);
  if (R == 0 || Lk == 0) {
    if (need_q) dq = zeros_like_sizes(query);
    if (need_k) dk = zeros_like_sizes(key);
    if (need_v) dv = zeros_like_sizes(value);
    if (need_s) ds = zeros_like_sizes(lsl);
    return {dq, dk, dv, ds};
  }
  const st::Tensor Aw = gemm_in(A, kern), goutw = gemm_in(gout, kern);
  if (need_v) {
    if (a.v.size(0) == 1) {
      dv = in_shape(to_dtype(aten("aten::mm", "", transposed(Aw, 0, 1), goutw), dt), value);
    } else {
      dv = in_shape(to_dtype(aten("aten::bmm", "", transposed(reshaped(Aw, {B, Lq, Lk}), 1, 2),
                                  reshaped(goutw, {B, Lq, Dv})),
                             dt),
                    value);
    }
  }
  if (!(need_q || need_k || need_s)) return {dq, dk, dv, ds};

  const st::Tensor knrm = normalize ? kern.row_norms(a.k) : st::Tensor();
  const st::Tensor wqk = st::empty({R, Lk}, acc, dev);
  const st::Tensor p = st::empty({R, Lk}, acc, dev);
  // GEMM operands, widened once: q for the GEMM path and grad_key, k for the GEMM path.
  const bool gemm_path = Lk > kern.max_fused_keys;
  const st::Tensor qw = gemm_path || need_k ? gemm_in(a.q, kern) : st::Tensor();
  const st::Tensor kw = gemm_path ? gemm_in(a.k, kern) : st::Tensor();
  // d loss / d <q_i, k_j> as a GEMM operand (acc already; the input dtype for cuBLAS).
  const auto wqk_in = [&] { return kern.gemm_in_acc ? wqk : to_dtype(wqk, dt); };
  if (!gemm_path) {
    const st::Tensor dq_rows = need_q ? empty_like_sizes(query, dt, dev) : st::Tensor();
    kern.fused_backward(a, knrm, gout, gattn, A, max_scale, normalize, dq_rows, wqk, p);
    if (need_q) dq = dq_rows;
  } else {
    const st::Tensor S = raw_dots(qw, kw);
    const st::Tensor vw = gemm_in(a.v, kern);
    const st::Tensor dA =
        contig(vw.size(0) == 1 ? aten("aten::mm", "", goutw, transposed(first(vw), 0, 1))
                               : aten("aten::bmm", "", reshaped(goutw, {B, Lq, Dv}), transposed(vw, 1, 2)));
    const st::Tensor qnrm = normalize ? kern.row_norms(a.q) : st::Tensor();
    const st::Tensor rowcoef = st::empty({R}, acc, dev);
    kern.softmax_backward(a, S, dA, gattn, A, qnrm, knrm, max_scale, normalize, wqk, p, rowcoef);
    if (need_q) {
      const st::Tensor w = reshaped(wqk_in(), {B, Lq, Lk});
      st::Tensor g = contig(kw.size(0) == 1 ? aten("aten::matmul", "", w, first(kw))
                                            : aten("aten::bmm", "", w, kw));  // [B, Lq, D]
      if (normalize) g = kern.minus_product(g, a.q, rowcoef);
      dq = in_shape(to_dtype(g, dt), query);
    }
  }
  if (need_k) {
    const st::Tensor w = wqk_in();
    st::Tensor g;
    if (a.k.size(0) == 1) {
      // qw as [R, D]: a view where its strides allow, else the copy reshape makes
      const st::Tensor qr = qw.is_contiguous() ? reshaped(qw, {R, D}) : torch::stable::reshape(qw, {R, D});
      g = aten("aten::mm", "", transposed(w, 0, 1), qr);  // [Lk, D]
    } else {
      g = aten("aten::bmm", "", transposed(reshaped(w, {B, Lq, Lk}), 1, 2), qw);  // [B, Lk, D]
    }
    if (normalize) {
      // Projection term of F.normalize's backward, only where the norm was not clamped to eps:
      // dk_j -= k_j / |k_j|^2 * scale * sum_i dlogit_ij cos_ij.
      const st::Tensor colsum = a.k.size(0) == 1
                                    ? torch::stable::sum(p, std::vector<int64_t>{0})
                                    : torch::stable::sum(reshaped(p, {B, Lq, Lk}), std::vector<int64_t>{1});
      const st::Tensor coef = kern.key_coef(a, contig(colsum), knrm, max_scale);
      g = kern.minus_product(contig(g), a.k, coef);
    }
    dk = in_shape(to_dtype(g, dt), key);
  }
  // d scale / d lsl = exp(lsl), and torch.clamp passes the gradient only where exp(lsl) <= max.
  if (need_s) ds = kern.scale_grad(a, torch::stable::sum(p), max_scale);
  return {dq, dk, dv, ds};
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "scaled_cross_attention(Tensor query, Tensor key, Tensor value, Tensor logit_scale_log, "
      "float max_scale=100.0, Tensor? key_mask=None, bool normalize=False) -> (Tensor, Tensor)");
  m.def(
      "_scaled_cross_attention_backward(Tensor grad_out, Tensor? grad_attn, Tensor query, Tensor key, "
      "Tensor value, Tensor logit_scale_log, Tensor attn, float max_scale, bool normalize, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
