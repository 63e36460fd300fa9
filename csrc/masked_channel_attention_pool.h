#pragma once
// Shape contract of masked_channel_attention_pool / masked_channel_attention_pool_packed and their
// backward ops, shared by all backends.
#include <optional>

#include "common/stable.h"
#include "common/stable_args.h"

namespace maskattn {

// Checked arguments of a forward op. Nothing is copied but the offsets (made contiguous) and a
// mask that is not bool (normalised to one).
struct ChannelPoolInputs {
  st::Tensor logits;    // [B,N,D] or [T,D]
  st::Tensor features;  // like logits
  st::Tensor mask;      // bool [B,N], or undefined (packed, or no mask)
  st::Tensor offsets;   // int64 [B+1], contiguous (packed), or undefined
};

ChannelPoolInputs check_channel_pool_inputs(const st::Tensor& logits, const st::Tensor& features,
                                            const std::optional<st::Tensor>& mask);

// Offset *values* are only checked where that needs no device sync (CPU); CUDA kernels clamp them.
ChannelPoolInputs check_channel_pool_packed_inputs(const st::Tensor& logits, const st::Tensor& features,
                                                   const st::Tensor& offsets);

// Checked arguments of a backward op: grad_pooled and pooled [B,D] (pooled as the forward returned
// it: the backward needs sum_n w f, and reading it saves a pass over the features); grad_weights like
// weights, or undefined; weights and features [B,N,D] (padded) or [T,D] (packed, with offsets [B+1]).
struct ChannelPoolGrads {
  st::Tensor grad_pooled;
  st::Tensor grad_weights;
  st::Tensor pooled;
  st::Tensor weights;
  st::Tensor features;
  st::Tensor offsets;  // contiguous, or undefined (padded)
};

ChannelPoolGrads check_channel_pool_grads(const st::Tensor& grad_pooled,
                                          const std::optional<st::Tensor>& grad_weights,
                                          const st::Tensor& pooled, const st::Tensor& weights,
                                          const st::Tensor& features,
                                          const std::optional<st::Tensor>& offsets);

}  // namespace maskattn
