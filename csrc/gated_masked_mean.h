#pragma once
// Shape contract of gated_masked_mean (sigmoid-gated masked global average pooling), shared by
// all backends.
#include <ATen/ATen.h>

#include <optional>

namespace maskattn {

struct GatedInputs {
  at::Tensor features;  // [B, C, H, W], any strides
  at::Tensor logits;    // [B, H, W] view of gate_logits ([B, 1, H, W] or [B, H, W])
  at::Tensor mask;      // bool [B, H, W] or undefined
};

GatedInputs check_gated_inputs(const at::Tensor& features, const at::Tensor& gate_logits,
                               const std::optional<at::Tensor>& mask, const char* op);

struct GatedGrads {
  at::Tensor grad_pooled;  // [B, C]
  at::Tensor grad_gate;    // [B, H, W] view, or undefined
  at::Tensor gate;         // [B, H, W] view
  at::Tensor mask;         // bool [B, H, W] or undefined
};

GatedGrads check_gated_grads(const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_gate,
                             const at::Tensor& features, const at::Tensor& gate,
                             const std::optional<at::Tensor>& mask);

// Stride of the merged H*W pixel dimension of a [B, C, H, W] tensor, or -1 when H and W do not
// merge into one strided dimension.
inline int64_t pixel_stride(const at::Tensor& f) {
  const int64_t H = f.size(2), W = f.size(3);
  if (W == 1) return f.stride(2);
  if (H == 1) return f.stride(3);
  return f.stride(2) == W * f.stride(3) ? f.stride(3) : -1;
}

}  // namespace maskattn
