#pragma once
// Shape contract of masked_channel_attention_pool / masked_channel_attention_pool_packed and their
// backward ops, shared by all backends.
#include <ATen/ATen.h>

#include <optional>

namespace maskattn {

// Checked arguments of a forward op. Nothing is copied but the offsets (made contiguous) and a
// mask that is not bool (normalised to one).
struct ChannelPoolInputs {
  at::Tensor logits;    // [B,N,D] or [T,D]
  at::Tensor features;  // like logits
  at::Tensor mask;      // bool [B,N], or undefined (packed, or no mask)
  at::Tensor offsets;   // int64 [B+1], contiguous (packed), or undefined
};

ChannelPoolInputs check_channel_pool_inputs(const at::Tensor& logits, const at::Tensor& features,
                                            const std::optional<at::Tensor>& mask);

// Offset *values* are only checked where that needs no device sync (CPU); CUDA kernels clamp them.
ChannelPoolInputs check_channel_pool_packed_inputs(const at::Tensor& logits, const at::Tensor& features,
                                                   const at::Tensor& offsets);

// Checked arguments of a backward op: grad_pooled and pooled [B,D] (pooled as the forward returned
// it: the backward needs sum_n w f, and reading it saves a pass over the features); grad_weights like
// weights, or undefined; weights and features [B,N,D] (padded) or [T,D] (packed, with offsets [B+1]).
struct ChannelPoolGrads {
  at::Tensor grad_pooled;
  at::Tensor grad_weights;
  at::Tensor pooled;
  at::Tensor weights;
  at::Tensor features;
  at::Tensor offsets;  // contiguous, or undefined (padded)
};

ChannelPoolGrads check_channel_pool_grads(const at::Tensor& grad_pooled,
                                          const std::optional<at::Tensor>& grad_weights,
                                          const at::Tensor& pooled, const at::Tensor& weights,
                                          const at::Tensor& features,
                                          const std::optional<at::Tensor>& offsets);

}  // namespace maskattn
