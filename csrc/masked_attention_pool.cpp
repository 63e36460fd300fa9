// Schemas of the attention-pooling ops and the argument checks every backend runs first.
#include "masked_attention_pool.h"

#include <algorithm>
#include <vector>

namespace maskattn {

PoolInputs check_pool_inputs(const st::Tensor& logits, const st::Tensor& features,
                             const std::optional<st::Tensor>& mask) {
  MASKATTN_CHECK(features.dim() == 3, "masked_attention_pool: features must be [B, N, D], got shape ",
                 st::shape_str(features));
  MASKATTN_CHECK(logits.dim() == 2 || logits.dim() == 3,
                 "masked_attention_pool: logits must be [B, N] or [B, N, K], got shape ",
                 st::shape_str(logits));
  st::check_floating(features, "masked_attention_pool: features");
  st::check_floating(logits, "masked_attention_pool: logits");
  st::check_same_dtype(logits, "masked_attention_pool", "logits", features, "features");
  st::check_same_device(logits, "masked_attention_pool: logits", features, "features");
  MASKATTN_CHECK(logits.size(0) == features.size(0) && logits.size(1) == features.size(1),
                 "masked_attention_pool: logits ", st::shape_str(logits), " and features ",
                 st::shape_str(features), " must agree in B and N");
  PoolInputs in;
  in.squeeze_k = logits.dim() == 2;
  in.logits = in.squeeze_k ? unsqueezed(logits, logits.dim()) : logits;
  in.features = features;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    MASKATTN_CHECK(m.dim() == 2 && m.size(0) == features.size(0) && m.size(1) == features.size(1),
                   "masked_attention_pool: mask must be [B, N] = [", features.size(0), ", ", features.size(1),
                   "] to match features ", st::shape_str(features), ", got shape ", st::shape_str(m));
    st::check_same_device(m, "masked_attention_pool: mask", features, "features");
    // checked here too so that the message names the op (as_bool_mask's own check cannot)
    st::check_mask_dtype(m, "masked_attention_pool", "mask");
    in.mask = st::as_bool_mask(m);
  }
  return in;
}

PackedInputs check_packed_inputs(const st::Tensor& logits, const st::Tensor& features,
                                 const st::Tensor& offsets) {
  MASKATTN_CHECK(features.dim() == 2, "masked_attention_pool_packed: features must be [T, D], got shape ",
                 st::shape_str(features));
  MASKATTN_CHECK(logits.dim() == 1 || logits.dim() == 2,
                 "masked_attention_pool_packed: logits must be [T] or [T, K], got shape ",
                 st::shape_str(logits));
  st::check_floating(features, "masked_attention_pool_packed: features");
  st::check_floating(logits, "masked_attention_pool_packed: logits");
  st::check_same_dtype(logits, "masked_attention_pool_packed", "logits", features, "features");
  MASKATTN_CHECK(logits.size(0) == features.size(0), "masked_attention_pool_packed: logits ",
                 st::shape_str(logits), " and features ", st::shape_str(features), " must agree in T");
  st::check_same_device(logits, "masked_attention_pool_packed: logits", features, "features");
  PackedInputs in;
  in.squeeze_k = logits.dim() == 1;
  in.logits = in.squeeze_k ? unsqueezed(logits, logits.dim()) : logits;
  in.features = features;
  in.offsets = check_offsets(offsets, features.size(0), features, "masked_attention_pool_packed", "features");
  return in;
}

PoolGrads check_pool_grads(const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_weights,
                           const st::Tensor& weights, const st::Tensor& features,
                           const std::optional<st::Tensor>& offsets) {
  const bool packed = offsets.has_value();
  const char* op = packed ? "_masked_attention_pool_packed_backward" : "_masked_attention_pool_backward";
  const int64_t fdim = packed ? 2 : 3;
  MASKATTN_CHECK(features.dim() == fdim, op, ": features must be ", packed ? "[T, D]" : "[B, N, D]",
                 ", got shape ", st::shape_str(features));
  MASKATTN_CHECK(weights.dim() == fdim - 1 || weights.dim() == fdim, op, ": weights must be ",
                 packed ? "[T] or [T, K]" : "[B, N] or [B, N, K]", ", got shape ", st::shape_str(weights));
  st::check_floating(features, op, "features");
  // weights are the forward's output in the logits' dtype, which is the features' dtype
  st::check_same_dtype(weights, op, "weights", features, "features");
  st::check_same_dtype(grad_pooled, op, "grad_pooled", features, "features");
  st::check_same_device(weights, op, "weights", features, "features");
  st::check_same_device(grad_pooled, op, "grad_pooled", features, "features");
  for (int64_t i = 0; i < fdim - 1; ++i) {
    MASKATTN_CHECK(weights.size(i) == features.size(i), op, ": weights ", st::shape_str(weights),
                   " does not match features ", st::shape_str(features), " in ", packed ? "T" : "B and N");
  }
  PoolGrads g;
  g.squeeze_k = weights.dim() == fdim - 1;
  g.weights = g.squeeze_k ? unsqueezed(weights, weights.dim()) : weights;
  if (packed) g.offsets = check_offsets(*offsets, features.size(0), features, op, "features");
  const int64_t K = g.weights.size(-1), D = features.size(-1);
  const int64_t B = packed ? g.offsets.size(0) - 1 : features.size(0);
  const std::vector<int64_t> want = g.squeeze_k ? std::vector<int64_t>{B, D} : std::vector<int64_t>{B, K, D};
  const auto gps = grad_pooled.sizes();
  MASKATTN_CHECK(gps.size() == want.size() && std::equal(want.begin(), want.end(), gps.begin()), op,
                 ": grad_pooled has shape ", st::shape_str(grad_pooled), ", expected ",
                 st::sizes_str(want, static_cast<int64_t>(want.size())),
                 " (the pooled output's: [B, D] for weights without a K dim, else [B, K, D])");
  g.grad_pooled = g.squeeze_k ? unsqueezed(grad_pooled, 1) : grad_pooled;
  if (grad_weights.has_value() && grad_weights->defined()) {
    const st::Tensor& gw = *grad_weights;
    MASKATTN_CHECK(st::same_sizes(gw, weights), op, ": grad_weights ", st::shape_str(gw),
                   " must match weights ", st::shape_str(weights));
    st::check_same_dtype(gw, op, "grad_weights", weights, "weights");
    st::check_same_device(gw, op, "grad_weights", features, "features");
    g.grad_weights = g.squeeze_k ? unsqueezed(gw, gw.dim()) : gw;
  }
  return g;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def("masked_attention_pool(Tensor logits, Tensor features, Tensor? mask=None) -> (Tensor, Tensor)");
  m.def(
      "_masked_attention_pool_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor weights, "
      "Tensor features, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("masked_attention_pool_packed(Tensor logits, Tensor features, Tensor offsets) -> (Tensor, Tensor)");
  m.def(
      "_masked_attention_pool_packed_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor weights, "
      "Tensor features, Tensor offsets, bool[2] output_mask) -> (Tensor, Tensor)");
}
