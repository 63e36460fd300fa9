// Schemas of the attention-pooling ops and the argument checks every backend runs first.
#include "masked_attention_pool.h"

#include <torch/library.h>

#include "common/checks.h"

namespace maskattn {

PoolInputs check_pool_inputs(const at::Tensor& logits, const at::Tensor& features,
                             const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(features.dim() == 3, "masked_attention_pool: features must be [B, N, D], got shape ",
              shape_str(features));
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3,
              "masked_attention_pool: logits must be [B, N] or [B, N, K], got shape ", shape_str(logits));
  check_floating(features, "masked_attention_pool: features");
  check_floating(logits, "masked_attention_pool: logits");
  TORCH_CHECK(logits.scalar_type() == features.scalar_type(), "masked_attention_pool: logits (",
              logits.scalar_type(), ") and features (", features.scalar_type(), ") must have the same dtype");
  check_same_device(logits, "masked_attention_pool: logits", features, "features");
  TORCH_CHECK(logits.size(0) == features.size(0) && logits.size(1) == features.size(1),
              "masked_attention_pool: logits ", shape_str(logits), " and features ", shape_str(features),
              " must agree in B and N");
  PoolInputs in;
  in.squeeze_k = logits.dim() == 2;
  in.logits = in.squeeze_k ? logits.unsqueeze(-1) : logits;
  in.features = features;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == features.size(0) && m.size(1) == features.size(1),
                "masked_attention_pool: mask must be [B, N] = [", features.size(0), ", ", features.size(1),
                "] to match features ", shape_str(features), ", got shape ", shape_str(m));
    check_same_device(m, "masked_attention_pool: mask", features, "features");
    // checked here too so that the message names the op (as_bool_mask's own check cannot)
    TORCH_CHECK(!m.is_complex(),
                "masked_attention_pool: mask must be a bool, integer or floating tensor, got ",
                m.scalar_type());
    in.mask = as_bool_mask(m);
  }
  return in;
}

PackedInputs check_packed_inputs(const at::Tensor& logits, const at::Tensor& features,
                                 const at::Tensor& offsets) {
  TORCH_CHECK(features.dim() == 2, "masked_attention_pool_packed: features must be [T, D], got shape ",
              shape_str(features));
  TORCH_CHECK(logits.dim() == 1 || logits.dim() == 2,
              "masked_attention_pool_packed: logits must be [T] or [T, K], got shape ", shape_str(logits));
  check_floating(features, "masked_attention_pool_packed: features");
  check_floating(logits, "masked_attention_pool_packed: logits");
  TORCH_CHECK(logits.scalar_type() == features.scalar_type(), "masked_attention_pool_packed: logits (",
              logits.scalar_type(), ") and features (", features.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(logits.size(0) == features.size(0), "masked_attention_pool_packed: logits ", shape_str(logits),
              " and features ", shape_str(features), " must agree in T");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1,
              "masked_attention_pool_packed: offsets must be 1-D [B+1] with B >= 0, got shape ",
              shape_str(offsets));
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "masked_attention_pool_packed: offsets must be int64, got ",
              offsets.scalar_type());
  check_same_device(logits, "masked_attention_pool_packed: logits", features, "features");
  check_same_device(offsets, "masked_attention_pool_packed: offsets", features, "features");
  PackedInputs in;
  in.squeeze_k = logits.dim() == 1;
  in.logits = in.squeeze_k ? logits.unsqueeze(-1) : logits;
  in.features = features;
  in.offsets = offsets.contiguous();
  if (offsets.is_cpu()) {
    const int64_t* o = in.offsets.const_data_ptr<int64_t>();
    const int64_t nb = offsets.size(0) - 1, T = features.size(0);
    TORCH_CHECK(o[0] == 0, "masked_attention_pool_packed: offsets[0] must be 0, got ", o[0]);
    for (int64_t b = 0; b < nb; ++b) {
      TORCH_CHECK(o[b + 1] >= o[b],
                  "masked_attention_pool_packed: offsets must be non-decreasing, but offsets[", b + 1,
                  "] = ", o[b + 1], " < offsets[", b, "] = ", o[b]);
    }
    TORCH_CHECK(o[nb] == T, "masked_attention_pool_packed: offsets[-1] = ", o[nb],
                " must equal T = features.size(0) = ", T);
  }
  return in;
}

PoolGrads check_pool_grads(const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_weights,
                           const at::Tensor& weights, const at::Tensor& features, int64_t num_bags,
                           bool packed) {
  const int64_t fdim = packed ? 2 : 3;
  TORCH_CHECK(features.dim() == fdim, "_masked_attention_pool_backward: features has shape ",
              shape_str(features));
  TORCH_CHECK(weights.dim() == fdim - 1 || weights.dim() == fdim,
              "_masked_attention_pool_backward: weights has shape ", shape_str(weights));
  PoolGrads g;
  g.squeeze_k = weights.dim() == fdim - 1;
  g.weights = g.squeeze_k ? weights.unsqueeze(-1) : weights;
  const int64_t K = g.weights.size(-1), D = features.size(-1);
  const int64_t B = num_bags;
  g.grad_pooled = g.squeeze_k ? grad_pooled.unsqueeze(1) : grad_pooled;
  TORCH_CHECK(g.grad_pooled.dim() == 3 && g.grad_pooled.size(0) == B && g.grad_pooled.size(1) == K &&
                  g.grad_pooled.size(2) == D,
              "_masked_attention_pool_backward: grad_pooled has shape ", shape_str(grad_pooled),
              ", expected [", B, ", ", K, ", ", D, "] (K squeezed when logits had no K dim)");
  for (int64_t i = 0; i < fdim - 1; ++i) {
    TORCH_CHECK(g.weights.size(i) == features.size(i), "_masked_attention_pool_backward: weights ",
                shape_str(weights), " does not match features ", shape_str(features));
  }
  if (grad_weights.has_value() && grad_weights->defined()) {
    TORCH_CHECK(grad_weights->sizes() == weights.sizes(), "_masked_attention_pool_backward: grad_weights ",
                shape_str(*grad_weights), " must match weights ", shape_str(weights));
    g.grad_weights = g.squeeze_k ? grad_weights->unsqueeze(-1) : *grad_weights;
  }
  return g;
}

}  // namespace maskattn

TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def("masked_attention_pool(Tensor logits, Tensor features, Tensor? mask=None) -> (Tensor, Tensor)");
  m.def(
      "_masked_attention_pool_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor weights, "
      "Tensor features, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("masked_attention_pool_packed(Tensor logits, Tensor features, Tensor offsets) -> (Tensor, Tensor)");
  m.def(
      "_masked_attention_pool_packed_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor weights, "
      "Tensor features, Tensor offsets, bool[2] output_mask) -> (Tensor, Tensor)");
}
