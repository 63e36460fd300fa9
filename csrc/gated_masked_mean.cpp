// Schema of gated_masked_mean and the argument checks every backend runs first.
//
//   gate[b,p]     = valid[b,p] * sigmoid(gate_logits[b,p])
//   pooled[b,c]   = sum_p gate[b,p] * features[b,c,p] / #valid(b)      (0 when nothing is valid)
// i.e. the thermal-face classifier's spatial-attention gate followed by global average pooling over
// the valid positions, without materialising gate * features.
#include "gated_masked_mean.h"

#include <torch/library.h>

#include "common/checks.h"

namespace maskattn {

GatedInputs check_gated_inputs(const at::Tensor& features, const at::Tensor& gate_logits,
                               const std::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, C, H, W], got shape ", shape_str(features));
  check_floating(features, op, "features");
  check_floating(gate_logits, op, "gate_logits");
  TORCH_CHECK(gate_logits.scalar_type() == features.scalar_type(), op, ": gate_logits (",
              gate_logits.scalar_type(), ") and features (", features.scalar_type(),
              ") must have the same dtype");
  check_same_device(gate_logits, op, "gate_logits", features, "features");
  const int64_t B = features.size(0), H = features.size(2), W = features.size(3);
  const bool l4 = gate_logits.dim() == 4 && gate_logits.size(1) == 1;
  TORCH_CHECK((l4 || gate_logits.dim() == 3) && gate_logits.size(0) == B && gate_logits.size(-2) == H &&
                  gate_logits.size(-1) == W,
              op, ": gate_logits must be [B, 1, H, W] or [B, H, W] = [", B, ", ", H, ", ", W,
              "] to match features ", shape_str(features), ", got shape ", shape_str(gate_logits));
  GatedInputs in;
  in.features = features;
  in.logits = l4 ? gate_logits.squeeze(1) : gate_logits;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == H && m.size(2) == W, op,
                ": mask must be [B, H, W] = [", B, ", ", H, ", ", W, "] to match features ",
                shape_str(features), ", got shape ", shape_str(m));
    check_same_device(m, op, "mask", features, "features");
    check_mask_dtype(m, op, "mask");
    in.mask = as_bool_mask(m);
  }
  return in;
}

GatedGrads check_gated_grads(const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_gate,
                             const at::Tensor& features, const at::Tensor& gate,
                             const std::optional<at::Tensor>& mask) {
  const char* op = "_gated_masked_mean_backward";
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, C, H, W], got shape ", shape_str(features));
  check_floating(features, op, "features");
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == B && grad_pooled.size(1) == C, op,
              ": grad_pooled must be [B, C] = [", B, ", ", C, "], got shape ", shape_str(grad_pooled));
  const bool g4 = gate.dim() == 4 && gate.size(1) == 1;
  TORCH_CHECK((g4 || gate.dim() == 3) && gate.size(0) == B && gate.size(-2) == H && gate.size(-1) == W, op,
              ": gate must be [B, 1, H, W] or [B, H, W] matching features ", shape_str(features),
              ", got shape ", shape_str(gate));
  // pooled has the features' dtype; gate has the gate logits' dtype, which is the features' too
  check_same_dtype(grad_pooled, op, "grad_pooled", features, "features");
  check_same_dtype(gate, op, "gate", features, "features");
  check_same_device(grad_pooled, op, "grad_pooled", features, "features");
  check_same_device(gate, op, "gate", features, "features");
  GatedGrads g;
  g.grad_pooled = grad_pooled;
  g.gate = g4 ? gate.squeeze(1) : gate;
  if (grad_gate.has_value() && grad_gate->defined()) {
    TORCH_CHECK(grad_gate->sizes() == gate.sizes(), op, ": grad_gate ", shape_str(*grad_gate),
                " must match gate ", shape_str(gate));
    check_same_dtype(*grad_gate, op, "grad_gate", gate, "gate");
    check_same_device(*grad_gate, op, "grad_gate", features, "features");
    g.grad_gate = g4 ? grad_gate->squeeze(1) : *grad_gate;
  }
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == B && mask->size(1) == H && mask->size(2) == W, op,
                ": mask must be [B, H, W] matching features ", shape_str(features), ", got shape ",
                shape_str(*mask));
    check_same_device(*mask, op, "mask", features, "features");
    check_mask_dtype(*mask, op, "mask");
    g.mask = as_bool_mask(*mask);
  }
  return g;
}

}  // namespace maskattn

TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "gated_masked_mean(Tensor features, Tensor gate_logits, Tensor? mask=None) -> (Tensor pooled, Tensor "
      "gate)");
  m.def(
      "_gated_masked_mean_backward(Tensor grad_pooled, Tensor? grad_gate, Tensor features, Tensor gate, "
      "Tensor? mask, bool[2] output_mask) -> (Tensor grad_features, Tensor grad_gate_logits)");
}
