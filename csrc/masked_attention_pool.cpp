// Schemas of the attention-pooling ops and the argument checks every backend runs first.
#include "masked_attention_pool.h"

#include <torch/library.h>

#include <vector>

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
  check_same_device(logits, "masked_attention_pool_packed: logits", features, "features");
  PackedInputs in;
  in.squeeze_k = logits.dim() == 1;
  in.logits = in.squeeze_k ? logits.unsqueeze(-1) : logits;
  in.features = features;
  in.offsets = check_offsets(offsets, features.size(0), features, "masked_attention_pool_packed", "features");
  return in;
}

PoolGrads check_pool_grads(const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_weights,
                           const at::Tensor& weights, const at::Tensor& features,
                           const std::optional<at::Tensor>& offsets) {
  const bool packed = offsets.has_value();
  const char* op = packed ? "_masked_attention_pool_packed_backward" : "_masked_attention_pool_backward";
  const int64_t fdim = packed ? 2 : 3;
  TORCH_CHECK(features.dim() == fdim, op, ": features must be ", packed ? "[T, D]" : "[B, N, D]",
              ", got shape ", shape_str(features));
  TORCH_CHECK(weights.dim() == fdim - 1 || weights.dim() == fdim, op, ": weights must be ",
              packed ? "[T] or [T, K]" : "[B, N] or [B, N, K]", ", got shape ", shape_str(weights));
  check_floating(features, op, "features");
  // weights are the forward's output in the logits' dtype, which is the features' dtype
  check_same_dtype(weights, op, "weights", features, "features");
  check_same_dtype(grad_pooled, op, "grad_pooled", features, "features");
  check_same_device(weights, op, "weights", features, "features");
  check_same_device(grad_pooled, op, "grad_pooled", features, "features");
  for (int64_t i = 0; i < fdim - 1; ++i) {
    TORCH_CHECK(weights.size(i) == features.size(i), op, ": weights ", shape_str(weights),
                " does not match features ", shape_str(features), " in ", packed ? "T" : "B and N");
  }
  PoolGrads g;
  g.squeeze_k = weights.dim() == fdim - 1;
  g.weights = g.squeeze_k ? weights.unsqueeze(-1) : weights;
  if (packed) g.offsets = check_offsets(*offsets, features.size(0), features, op, "features");
  const int64_t K = g.weights.size(-1), D = features.size(-1);
  const int64_t B = packed ? g.offsets.size(0) - 1 : features.size(0);
  const std::vector<int64_t> want = g.squeeze_k ? std::vector<int64_t>{B, D} : std::vector<int64_t>{B, K, D};
  TORCH_CHECK(grad_pooled.sizes() == at::IntArrayRef(want), op, ": grad_pooled has shape ",
              shape_str(grad_pooled), ", expected ", at::IntArrayRef(want),
              " (the pooled output's: [B, D] for weights without a K dim, else [B, K, D])");
  g.grad_pooled = g.squeeze_k ? grad_pooled.unsqueeze(1) : grad_pooled;
  if (grad_weights.has_value() && grad_weights->defined()) {
    const at::Tensor& gw = *grad_weights;
    TORCH_CHECK(gw.sizes() == weights.sizes(), op, ": grad_weights ", shape_str(gw), " must match weights ",
                shape_str(weights));
    check_same_dtype(gw, op, "grad_weights", weights, "weights");
    check_same_device(gw, op, "grad_weights", features, "features");
    g.grad_weights = g.squeeze_k ? gw.unsqueeze(-1) : gw;
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
