// Schema of gated_attention_scores and the argument checks every backend runs first.
//
//   v = v_pre + v_bias, u = u_pre + u_bias   (each bias [H], optional)
//   scores[..., k] = sum_j act(v[..., j]) * sigmoid(u[..., j]) * weight[k, j] + bias[k]
//
// i.e. CLAM's Attn_Net_Gated after its two Linear layers: v_pre = attention_a's Linear output,
// u_pre = attention_b's, weight / bias = attention_c. Fused, the [..., H] activations and their
// product are never stored: the forward reads v_pre and u_pre once and writes [..., K]; the backward
// recomputes the activations, reads them once more and writes their two gradients.
#include "gated_attention_scores.h"

#include "common/cpu_alloc.h"
#include "common/stable_args.h"

namespace maskattn {

GateAct parse_gate_act(const std::string& act, const char* op) {
  if (act == "tanh") return GateAct::kTanh;
  if (act == "relu") return GateAct::kRelu;
  if (act == "gelu") return GateAct::kGelu;
  MASKATTN_CHECK(false, op, ": act must be 'tanh', 'relu' or 'gelu', got '", act, "'");
  return GateAct::kTanh;
}

GateRows gate_rows(const st::Tensor& t) {
  const st::View v = st::View::of(t);
  GateRows r;
  r.H = v.size[v.ndim - 1];
  r.M = 1;
  for (int d = 0; d < v.ndim - 1; ++d) r.M *= v.size[d];
  // Rows of unit stride whose leading dims merge into one stride (size-1 dims merge with anything).
  bool ok = r.H <= 1 || v.stride[v.ndim - 1] == 1;
  int64_t rs = -1, span = 1;  // rs: the stride of the merged row dim; span: rows covered so far
  for (int d = v.ndim - 2; d >= 0 && ok; --d) {
    if (v.size[d] == 1) continue;
    if (rs < 0) {
      rs = v.stride[d];
    } else {
      ok = v.stride[d] == rs * span;
    }
    span *= v.size[d];
  }
  r.data = ok ? t : torch::stable::contiguous(t);
  r.rs = ok && rs >= 0 ? rs : r.H;
  return r;
}

GateInputs check_gate_inputs(const st::Tensor& v_pre, const st::Tensor& u_pre, const st::Tensor& weight,
                             const std::optional<st::Tensor>& bias, const std::string& act,
                             const std::optional<st::Tensor>& v_bias, const std::optional<st::Tensor>& u_bias,
                             const char* op, const st::Tensor* grad) {
  MASKATTN_CHECK(v_pre.dim() >= 1, op, ": v_pre must be [..., H] with at least one dim, got shape ",
                 st::shape_str(v_pre));
  st::check_floating(v_pre, op, "v_pre");
  MASKATTN_CHECK(st::same_sizes(u_pre, v_pre), op, ": u_pre ", st::shape_str(u_pre), " must match v_pre ",
                 st::shape_str(v_pre));
  st::check_same_dtype(u_pre, op, "u_pre", v_pre, "v_pre");
  st::check_same_device(u_pre, op, "u_pre", v_pre, "v_pre");
  const int64_t H = v_pre.size(v_pre.dim() - 1);
  MASKATTN_CHECK(weight.dim() == 2 && weight.size(1) == H, op, ": weight must be [K, H] with H = ", H,
                 " (the last dim of v_pre ", st::shape_str(v_pre), "), got shape ", st::shape_str(weight));
  st::check_same_dtype(weight, op, "weight", v_pre, "v_pre");
  st::check_same_device(weight, op, "weight", v_pre, "v_pre");
  GateInputs in;
  in.K = weight.size(0);
  const auto sz = v_pre.sizes();
  in.out_sizes.assign(sz.begin(), sz.end());
  in.out_sizes.back() = in.K;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    MASKATTN_CHECK(bias->dim() == 1 && bias->size(0) == in.K, op, ": bias must be [K] = [", in.K,
                   "] to match weight ", st::shape_str(weight), ", got shape ", st::shape_str(*bias));
    st::check_same_dtype(*bias, op, "bias", v_pre, "v_pre");
    st::check_same_device(*bias, op, "bias", v_pre, "v_pre");
  }
  auto check_hidden_bias = [&](const std::optional<st::Tensor>& b, const char* name) {
    if (!b.has_value() || !b->defined()) return false;
    MASKATTN_CHECK(b->dim() == 1 && b->size(0) == H, op, ": ", name, " must be [H] = [", H,
                   "] to match v_pre ", st::shape_str(v_pre), ", got shape ", st::shape_str(*b));
    st::check_same_dtype(*b, op, name, v_pre, "v_pre");
    st::check_same_device(*b, op, name, v_pre, "v_pre");
    return true;
  };
  const bool has_vb = check_hidden_bias(v_bias, "v_bias"), has_ub = check_hidden_bias(u_bias, "u_bias");
  in.act = parse_gate_act(act, op);
  if (grad != nullptr) {
    const auto& os = in.out_sizes;
    bool shape_ok = grad->dim() == static_cast<int64_t>(os.size());
    for (size_t d = 0; shape_ok && d < os.size(); ++d)
      shape_ok = grad->size(static_cast<int64_t>(d)) == os[d];
    MASKATTN_CHECK(
        shape_ok, op, ": grad must be [..., K] = ", st::sizes_str(os.data(), static_cast<int64_t>(os.size())),
        " (v_pre ", st::shape_str(v_pre), " with K = ", in.K, "), got shape ", st::shape_str(*grad));
    st::check_same_dtype(*grad, op, "grad", v_pre, "v_pre");
    st::check_same_device(*grad, op, "grad", v_pre, "v_pre");
  }
  // Copies only once every argument is known good: a zero-stride [2^40, H] weight that some other
  // argument's shape refuses must be refused, not materialised.
  if (has_bias) in.bias = torch::stable::contiguous(*bias);
  if (has_vb) in.v_bias = torch::stable::contiguous(*v_bias);
  if (has_ub) in.u_bias = torch::stable::contiguous(*u_bias);
  in.v = gate_rows(v_pre);
  in.u = gate_rows(u_pre);
  in.weight = torch::stable::contiguous(weight);
  return in;
}

GateBackward prepare_gate_backward(const st::Tensor& grad, const st::Tensor& v_pre, const st::Tensor& u_pre,
                                   const st::Tensor& weight, const std::string& act,
                                   const std::optional<st::Tensor>& v_bias,
                                   const std::optional<st::Tensor>& u_bias,
                                   const std::vector<bool>& output_mask) {
  const char* op = "_gated_attention_scores_backward";
  st::check_output_mask(output_mask, 6);
  GateBackward g;
  g.in = check_gate_inputs(v_pre, u_pre, weight, std::nullopt, act, v_bias, u_bias, op, &grad);
  g.need_v = output_mask[0], g.need_u = output_mask[1], g.need_w = output_mask[2], g.need_b = output_mask[3];
  g.need_vb = output_mask[4], g.need_ub = output_mask[5];
  const st::Device dev = v_pre.device();
  const st::ScalarType dt = v_pre.scalar_type();
  const st::View vv = st::View::of(v_pre);
  // [M, H] each: on the CPU backed by huge pages, whose first touch costs a fraction of 4 KiB pages'
  g.grad_v = g.need_v ? cpu::empty_large(vv.size, vv.ndim, dt, dev, op) : st::empty({0}, dt, dev);
  g.grad_u = g.need_u ? cpu::empty_large(vv.size, vv.ndim, dt, dev, op) : st::empty({0}, dt, dev);
  g.grad_weight = g.need_w ? st::empty({g.in.K, g.in.v.H}, dt, dev) : st::empty({0}, dt, dev);
  g.grad_bias = g.need_b ? st::empty({g.in.K}, dt, dev) : st::empty({0}, dt, dev);
  g.grad_v_bias = g.need_vb ? st::empty({g.in.v.H}, dt, dev) : st::empty({0}, dt, dev);
  g.grad_u_bias = g.need_ub ? st::empty({g.in.v.H}, dt, dev) : st::empty({0}, dt, dev);
  if (g.need_v || g.need_u || g.need_w || g.need_b || g.need_vb || g.need_ub)
    g.grad = acc_contiguous(grad, st::acc_dtype(dt));
  return g;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "gated_attention_scores(Tensor v_pre, Tensor u_pre, Tensor weight, Tensor? bias=None, str "
      "act=\"tanh\", "
      "Tensor? v_bias=None, Tensor? u_bias=None) -> Tensor");
  m.def(
      "_gated_attention_scores_backward(Tensor grad, Tensor v_pre, Tensor u_pre, Tensor weight, str act, "
      "Tensor? v_bias, Tensor? u_bias, bool[6] output_mask) -> (Tensor grad_v_pre, Tensor grad_u_pre, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_v_bias, Tensor grad_u_bias)");
}
