#pragma once
// Shape contract of gated_masked_mean (sigmoid-gated masked global average pooling), shared by
// all backends.
#include <optional>

#include "common/stable.h"

namespace maskattn {

struct GatedInputs {
  st::Tensor logits;  // gate_logits as passed ([B, 1, H, W] or [B, H, W])
  st::View lv;        // its [B, H, W] view, any strides
  st::Tensor mask;    // bool [B, H, W] or undefined
};

GatedInputs check_gated_inputs(const st::Tensor& features, const st::Tensor& gate_logits,
                               const std::optional<st::Tensor>& mask, const char* op);

struct GatedGrads {
  st::Tensor grad_gate;  // as passed (the gate's shape), or undefined
  st::Tensor mask;       // bool [B, H, W] or undefined
};

GatedGrads check_gated_grads(const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_gate,
                             const st::Tensor& features, const st::Tensor& gate,
                             const std::optional<st::Tensor>& mask);

// Stride of the merged H*W pixel dimension of a [B, C, H, W] tensor, or -1 when H and W do not
// merge into one strided dimension.
inline int64_t pixel_stride(const st::View& f) {
  const int64_t H = f.size[2], W = f.size[3];
  if (W == 1) return f.stride[2];
  if (H == 1) return f.stride[3];
  return f.stride[2] == W * f.stride[3] ? f.stride[3] : -1;
}

}  // namespace maskattn
