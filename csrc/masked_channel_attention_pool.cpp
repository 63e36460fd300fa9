// Schemas of the channel-wise attention-pooling ops (PyG's feature-level gate: one softmax per bag
// and channel) and the argument checks every backend runs first.
#include "masked_channel_attention_pool.h"

#include <cstdint>
#include <string>
#include <vector>

namespace maskattn {
namespace {

constexpr const char* kPadded = "masked_channel_attention_pool";
constexpr const char* kPacked = "masked_channel_attention_pool_packed";

bool has_sizes(const st::Tensor& t, const std::vector<int64_t>& s) {
  const auto ts = t.sizes();
  if (ts.size() != s.size()) return false;
  for (size_t i = 0; i < s.size(); ++i)
    if (ts[i] != s[i]) return false;
  return true;
}

std::string sizes_of(const std::vector<int64_t>& s) {
  return st::sizes_str(s, static_cast<int64_t>(s.size()));
}

std::vector<int64_t> sizes_vec(const st::Tensor& t) {
  const auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

// logits and features: floating, one dtype, one device, one shape.
void check_logits_features(const char* op, const st::Tensor& logits, const st::Tensor& features) {
  st::check_floating(features, op, "features");
  st::check_floating(logits, op, "logits");
  st::check_same_dtype(logits, op, "logits", features, "features");
  st::check_same_device(logits, op, "logits", features, "features");
  MASKATTN_CHECK(st::same_sizes(logits, features), op, ": logits ", st::shape_str(logits), " and features ",
                 st::shape_str(features), " must have the same shape (one gate logit per row and channel)");
}

// A gradient matches the tensor it is the gradient of: shape, dtype, device.
void check_grad_like(const char* op, const st::Tensor& grad, const char* gname,
                     const std::vector<int64_t>& shape, st::ScalarType dtype, const st::Tensor& of,
                     const char* ofname) {
  MASKATTN_CHECK(has_sizes(grad, shape), op, ": ", gname, " has shape ", st::shape_str(grad), ", expected ",
                 sizes_of(shape), " (", ofname, ")");
  MASKATTN_CHECK(grad.scalar_type() == dtype, op, ": ", gname, " (", st::dtype_str(grad),
                 ") must have the dtype of ", ofname, " (", torch::headeronly::toString(dtype), ")");
  st::check_same_device(grad, op, gname, of, "features");
}

}  // namespace

ChannelPoolInputs check_channel_pool_inputs(const st::Tensor& logits, const st::Tensor& features,
                                            const std::optional<st::Tensor>& mask) {
  MASKATTN_CHECK(features.dim() == 3, kPadded, ": features must be [B, N, D], got shape ",
                 st::shape_str(features));
  MASKATTN_CHECK(logits.dim() == 3, kPadded,
                 ": logits must be [B, N, D] (one gate logit per row and channel), got shape ",
                 st::shape_str(logits));
  check_logits_features(kPadded, logits, features);
  ChannelPoolInputs in;
  in.logits = logits;
  in.features = features;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    MASKATTN_CHECK(m.dim() == 2 && m.size(0) == features.size(0) && m.size(1) == features.size(1), kPadded,
                   ": mask must be [B, N] = [", features.size(0), ", ", features.size(1),
                   "] to match features ", st::shape_str(features), ", got shape ", st::shape_str(m));
    st::check_same_device(m, kPadded, "mask", features, "features");
    // checked here too so that the message names the op (as_bool_mask cannot)
    st::check_mask_dtype(m, kPadded, "mask");
    in.mask = st::as_bool_mask(m);
  }
  return in;
}

ChannelPoolInputs check_channel_pool_packed_inputs(const st::Tensor& logits, const st::Tensor& features,
                                                   const st::Tensor& offsets) {
  MASKATTN_CHECK(features.dim() == 2, kPacked, ": features must be [T, D], got shape ",
                 st::shape_str(features));
  MASKATTN_CHECK(logits.dim() == 2, kPacked,
                 ": logits must be [T, D] (one gate logit per row and channel), got shape ",
                 st::shape_str(logits));
  check_logits_features(kPacked, logits, features);
  ChannelPoolInputs in;
  in.logits = logits;
  in.features = features;
  in.offsets = check_offsets(offsets, features.size(0), features, kPacked, "features");
  return in;
}

ChannelPoolGrads check_channel_pool_grads(const st::Tensor& grad_pooled,
                                          const std::optional<st::Tensor>& grad_weights,
                                          const st::Tensor& pooled, const st::Tensor& weights,
                                          const st::Tensor& features,
                                          const std::optional<st::Tensor>& offsets) {
  const bool packed = offsets.has_value();
  const char* op =
      packed ? "_masked_channel_attention_pool_packed_backward" : "_masked_channel_attention_pool_backward";
  MASKATTN_CHECK(features.dim() == (packed ? 2 : 3), op, ": features must be ",
                 packed ? "[T, D]" : "[B, N, D]", ", got shape ", st::shape_str(features));
  st::check_floating(features, op, "features");
  MASKATTN_CHECK(st::same_sizes(weights, features), op, ": weights ", st::shape_str(weights),
                 " must have the shape of features ", st::shape_str(features));
  st::check_same_dtype(weights, op, "weights", features, "features");
  st::check_same_device(weights, op, "weights", features, "features");
  ChannelPoolGrads g;
  int64_t B = features.size(0);
  if (packed) {
    g.offsets = check_offsets(*offsets, features.size(0), features, op, "features");
    B = g.offsets.size(0) - 1;
  }
  const int64_t D = features.size(-1);
  const std::vector<int64_t> pooled_shape{B, D};
  MASKATTN_CHECK(has_sizes(pooled, pooled_shape), op, ": pooled has shape ", st::shape_str(pooled),
                 ", expected [B, D] = ", sizes_of(pooled_shape), packed ? " (B = offsets.size(0) - 1)" : "");
  st::check_same_dtype(pooled, op, "pooled", features, "features");
  st::check_same_device(pooled, op, "pooled", features, "features");
  check_grad_like(op, grad_pooled, "grad_pooled", pooled_shape, pooled.scalar_type(), features, "pooled");
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_grad_like(op, *grad_weights, "grad_weights", sizes_vec(weights), weights.scalar_type(), features,
                    "weights");
    g.grad_weights = *grad_weights;
  }
  g.grad_pooled = grad_pooled;
  g.pooled = pooled;
  g.weights = weights;
  g.features = features;
  return g;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def(
      "masked_channel_attention_pool(Tensor logits, Tensor features, Tensor? mask=None) -> (Tensor, Tensor)");
  m.def(
      "_masked_channel_attention_pool_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor pooled, "
      "Tensor weights, Tensor features, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "masked_channel_attention_pool_packed(Tensor logits, Tensor features, Tensor offsets) -> (Tensor, "
      "Tensor)");
  m.def(
      "_masked_channel_attention_pool_packed_backward(Tensor grad_pooled, Tensor? grad_weights, Tensor "
      "pooled, "
      "Tensor weights, Tensor features, Tensor offsets, bool[2] output_mask) -> (Tensor, Tensor)");
}
