#pragma once
// Shape contract of gated_masked_mean (sigmoid-gated masked global average pooling), shared by
// all backends.
#include <optional>
#include <vector>

#include "common/stable.h"

namespace maskattn {

struct GatedInputs {
  st::Tensor logits;  // gate_logits as passed ([B, 1, H, W] or [B, H, W])
  st::View lv;        // its [B, H, W] view, any strides
  st::Tensor mask;    // bool [B, H, W] or undefined
};

GatedInputs check_gated_inputs(const st::Tensor& features, const st::Tensor& gate_logits,
                               const std::optional<st::Tensor>& mask, const char* op);

// The backward op's checked arguments and allocated outputs, the same for every device.
struct GatedBackward {
  int64_t B = 0, C = 0, H = 0, W = 0, HW = 0;
  bool need_f = false, need_l = false;
  st::Tensor mask;           // bool [B, H, W] or undefined
  st::Tensor grad_features;  // [B, C, H, W], or empty [0] when not asked for
  st::Tensor grad_logits;    // the gate's shape, or empty [0]
  // The small operands (B*C, B*H*W elements) in the accumulation dtype and contiguous, once: opcheck
  // passes expanded (zero-stride) gradients. Undefined when no gradient is asked for.
  st::Tensor grad_pooled, grad_gate, gate;
};

GatedBackward prepare_gated_backward(const st::Tensor& grad_pooled,
                                     const std::optional<st::Tensor>& grad_gate, const st::Tensor& features,
                                     const st::Tensor& gate, const std::optional<st::Tensor>& mask,
                                     const std::vector<bool>& output_mask);

// Stride of the merged H*W pixel dimension of a [B, C, H, W] tensor, or -1 when H and W do not
// merge into one strided dimension.
inline int64_t pixel_stride(const st::View& f) {
  const int64_t H = f.size[2], W = f.size[3];
  if (W == 1) return f.stride[2];
  if (H == 1) return f.stride[3];
  return f.stride[2] == W * f.stride[3] ? f.stride[3] : -1;
}

}  // namespace maskattn
