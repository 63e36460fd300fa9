#pragma once
// Shape contract of masked_attention_pool / masked_attention_pool_packed, shared by all backends.
#include <optional>
#include <vector>

#include "common/stable.h"
#include "common/stable_args.h"

namespace maskattn {

// Checked, normalised view of the padded op's arguments: logits as [B,N,K] and mask as a bool
// [B,N] view (or undefined). Nothing is copied.
struct PoolInputs {
  st::Tensor logits;    // [B,N,K]
  st::Tensor features;  // [B,N,D]
  st::Tensor mask;      // bool [B,N] or undefined
  bool squeeze_k;       // logits came in as [B,N]
};

PoolInputs check_pool_inputs(const st::Tensor& logits, const st::Tensor& features,
                             const std::optional<st::Tensor>& mask);

// Same for the packed op: logits as [T,K]; offsets int64 [B+1]. Offset *values* are only checked
// where that needs no device sync (CPU); CUDA kernels clamp them instead.
struct PackedInputs {
  st::Tensor logits;    // [T,K]
  st::Tensor features;  // [T,D]
  st::Tensor offsets;   // int64 [B+1], contiguous
  bool squeeze_k;
};

PackedInputs check_packed_inputs(const st::Tensor& logits, const st::Tensor& features,
                                 const st::Tensor& offsets);

// The backward ops take the forward's (possibly K-squeezed) tensors; this views them as the
// kernels' [.., K] layout and checks that they belong together: ranks, sizes, dtypes (every
// gradient in the dtype of what it is the gradient of), devices, and for the packed op (offsets
// given) the offsets as check_packed_inputs does.
struct PoolGrads {
  st::Tensor grad_pooled;   // [B,K,D]
  st::Tensor grad_weights;  // like weights, or undefined
  st::Tensor weights;       // [B,N,K] or [T,K]
  st::Tensor offsets;       // packed: int64 [B+1], contiguous; else undefined
  bool squeeze_k;
};

PoolGrads check_pool_grads(const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights,
                           const st::Tensor& weights, const st::Tensor& features,
                           const std::optional<st::Tensor>& offsets);

// Tensor.unsqueeze(d) as a tensor of its own handle: one C call (st::as_strided), not a boxed
// dispatcher call.
inline st::Tensor unsqueezed(const st::Tensor& t, int d) {
  return st::as_strided(t, st::View::of(t).insert(d));
}

}  // namespace maskattn
