// Schema of gated_masked_mean and the argument checks every backend runs first.
//
//   gate[b,p]     = valid[b,p] * sigmoid(gate_logits[b,p])
//   pooled[b,c]   = sum_p gate[b,p] * features[b,c,p] / #valid(b)      (0 when nothing is valid)
// i.e. the thermal-face classifier's spatial-attention gate followed by global average pooling over
// the valid positions, without materialising gate * features.
#include "gated_masked_mean.h"

namespace maskattn {

GatedInputs check_gated_inputs(const st::Tensor& features, const st::Tensor& gate_logits,
                               const std::optional<st::Tensor>& mask, const char* op) {
  MASKATTN_CHECK(features.dim() == 4, op, ": features must be [B, C, H, W], got shape ",
                 st::shape_str(features));
  st::check_floating(features, op, "features");
  st::check_floating(gate_logits, op, "gate_logits");
  st::check_same_dtype(gate_logits, op, "gate_logits", features, "features");
  st::check_same_device(gate_logits, op, "gate_logits", features, "features");
  const int64_t B = features.size(0), H = features.size(2), W = features.size(3);
  const int64_t ld = gate_logits.dim();
  const bool l4 = ld == 4 && gate_logits.size(1) == 1;
  MASKATTN_CHECK((l4 || ld == 3) && gate_logits.size(0) == B && gate_logits.size(ld - 2) == H &&
                     gate_logits.size(ld - 1) == W,
                 op, ": gate_logits must be [B, 1, H, W] or [B, H, W] = [", B, ", ", H, ", ", W,
                 "] to match features ", st::shape_str(features), ", got shape ", st::shape_str(gate_logits));
  GatedInputs in;
  in.logits = gate_logits;
  in.lv = l4 ? st::View::of(gate_logits).drop(1) : st::View::of(gate_logits);
  if (mask.has_value() && mask->defined()) {
    const st::Tensor& m = *mask;
    MASKATTN_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == H && m.size(2) == W, op,
                   ": mask must be [B, H, W] = [", B, ", ", H, ", ", W, "] to match features ",
                   st::shape_str(features), ", got shape ", st::shape_str(m));
    st::check_same_device(m, op, "mask", features, "features");
    st::check_mask_dtype(m, op, "mask");
    in.mask = st::as_bool_mask(m);
  }
  return in;
}

GatedBackward prepare_gated_backward(const st::Tensor& grad_pooled,
                                     const std::optional<st::Tensor>& grad_gate, const st::Tensor& features,
                                     const st::Tensor& gate, const std::optional<st::Tensor>& mask,
                                     const std::vector<bool>& output_mask) {
  const char* op = "_gated_masked_mean_backward";
  st::check_output_mask(output_mask);
  MASKATTN_CHECK(features.dim() == 4, op, ": features must be [B, C, H, W], got shape ",
                 st::shape_str(features));
  st::check_floating(features, op, "features");
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  MASKATTN_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == B && grad_pooled.size(1) == C, op,
                 ": grad_pooled must be [B, C] = [", B, ", ", C, "], got shape ", st::shape_str(grad_pooled));
  const int64_t gd = gate.dim();
  const bool g4 = gd == 4 && gate.size(1) == 1;
  MASKATTN_CHECK((g4 || gd == 3) && gate.size(0) == B && gate.size(gd - 2) == H && gate.size(gd - 1) == W, op,
                 ": gate must be [B, 1, H, W] or [B, H, W] matching features ", st::shape_str(features),
                 ", got shape ", st::shape_str(gate));
  // pooled has the features' dtype; gate has the gate logits' dtype, which is the features' too
  st::check_same_dtype(grad_pooled, op, "grad_pooled", features, "features");
  st::check_same_dtype(gate, op, "gate", features, "features");
  st::check_same_device(grad_pooled, op, "grad_pooled", features, "features");
  st::check_same_device(gate, op, "gate", features, "features");
  const bool has_grad_gate = grad_gate.has_value() && grad_gate->defined();
  if (has_grad_gate) {
    MASKATTN_CHECK(grad_gate->sizes() == gate.sizes(), op, ": grad_gate ", st::shape_str(*grad_gate),
                   " must match gate ", st::shape_str(gate));
    st::check_same_dtype(*grad_gate, op, "grad_gate", gate, "gate");
    st::check_same_device(*grad_gate, op, "grad_gate", features, "features");
  }
  GatedBackward g;
  if (mask.has_value() && mask->defined()) {
    MASKATTN_CHECK(mask->dim() == 3 && mask->size(0) == B && mask->size(1) == H && mask->size(2) == W, op,
                   ": mask must be [B, H, W] matching features ", st::shape_str(features), ", got shape ",
                   st::shape_str(*mask));
    st::check_same_device(*mask, op, "mask", features, "features");
    st::check_mask_dtype(*mask, op, "mask");
    g.mask = st::as_bool_mask(*mask);
  }
  g.B = B, g.C = C, g.H = H, g.W = W, g.HW = H * W;
  g.need_f = output_mask[0], g.need_l = output_mask[1];
  const st::Device dev = features.device();
  const st::ScalarType dt = features.scalar_type();
  g.grad_features = g.need_f ? st::empty({B, C, H, W}, dt, dev) : st::empty({0}, dt, dev);
  // The gate's shape ([B, 1, H, W] or [B, H, W]); the kernels index it as [B, H*W].
  const st::View gv = st::View::of(gate);
  g.grad_logits = g.need_l ? st::empty(gv.size, gv.ndim, dt, dev) : st::empty({0}, dt, dev);
  if (!g.need_f && !g.need_l) return g;
  const st::ScalarType acc = st::acc_dtype(dt);
  g.grad_pooled = torch::stable::contiguous(torch::stable::to(grad_pooled, acc));
  if (has_grad_gate) g.grad_gate = torch::stable::contiguous(torch::stable::to(*grad_gate, acc));
  g.gate = torch::stable::contiguous(gate);
  return g;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "gated_masked_mean(Tensor features, Tensor gate_logits, Tensor? mask=None) -> (Tensor pooled, Tensor "
      "gate)");
  m.def(
      "_gated_masked_mean_backward(Tensor grad_pooled, Tensor? grad_gate, Tensor features, Tensor gate, "
      "Tensor? mask, bool[2] output_mask) -> (Tensor grad_features, Tensor grad_gate_logits)");
}
