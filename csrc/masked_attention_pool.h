#pragma once
// Shape contract of masked_attention_pool / masked_attention_pool_packed, shared by all backends.
#include <ATen/ATen.h>

#include <optional>

namespace maskattn {

// Checked, normalised view of the padded op's arguments: logits as [B,N,K] and mask as a bool
// [B,N] view (or undefined). Nothing is copied.
struct PoolInputs {
  at::Tensor logits;    // [B,N,K]
  at::Tensor features;  // [B,N,D]
  at::Tensor mask;      // bool [B,N] or undefined
  bool squeeze_k;       // logits came in as [B,N]
};

PoolInputs check_pool_inputs(const at::Tensor& logits, const at::Tensor& features,
                             const std::optional<at::Tensor>& mask);

// Same for the packed op: logits as [T,K]; offsets int64 [B+1]. Offset *values* are only checked
// where that needs no device sync (CPU); CUDA kernels clamp them instead.
struct PackedInputs {
  at::Tensor logits;    // [T,K]
  at::Tensor features;  // [T,D]
  at::Tensor offsets;   // int64 [B+1], contiguous
  bool squeeze_k;
};

PackedInputs check_packed_inputs(const at::Tensor& logits, const at::Tensor& features,
                                 const at::Tensor& offsets);

// The backward ops take the forward's (possibly K-squeezed) tensors; this views them as the
// kernels' [.., K] layout and checks that they belong together: ranks, sizes, dtypes (every
// gradient in the dtype of what it is the gradient of), devices, and for the packed op (offsets
// given) the offsets as check_packed_inputs does.
struct PoolGrads {
  at::Tensor grad_pooled;   // [B,K,D]
  at::Tensor grad_weights;  // like weights, or undefined
  at::Tensor weights;       // [B,N,K] or [T,K]
  at::Tensor offsets;       // packed: int64 [B+1], contiguous; else undefined
  bool squeeze_k;
};

PoolGrads check_pool_grads(const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_weights,
                           const at::Tensor& weights, const at::Tensor& features,
                           const std::optional<at::Tensor>& offsets);

}  // namespace maskattn
