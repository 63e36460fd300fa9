// Schemas of the channel-wise attention-pooling ops (PyG's feature-level gate: one softmax per bag
// and channel) and the argument checks every backend runs first.
#include "masked_channel_attention_pool.h"

#include <torch/library.h>

#include <string>

#include "common/checks.h"

namespace maskattn {
namespace {

constexpr const char* kPadded = "masked_channel_attention_pool";
constexpr const char* kPacked = "masked_channel_attention_pool_packed";

std::string arg(const char* op, const char* name) {
  return std::string(op) + ": " + name;
}

// logits and features: floating, one dtype, one device, one shape.
void check_logits_features(const char* op, const at::Tensor& logits, const at::Tensor& features) {
  check_floating(features, arg(op, "features").c_str());
  check_floating(logits, arg(op, "logits").c_str());
  TORCH_CHECK(logits.scalar_type() == features.scalar_type(), op, ": logits (", logits.scalar_type(),
              ") and features (", features.scalar_type(), ") must have the same dtype");
  check_same_device(logits, arg(op, "logits").c_str(), features, "features");
  TORCH_CHECK(logits.sizes() == features.sizes(), op, ": logits ", shape_str(logits), " and features ",
              shape_str(features), " must have the same shape (one gate logit per row and channel)");
}

// A gradient matches the tensor it is the gradient of: shape, dtype, device.
void check_grad_like(const char* op, const at::Tensor& grad, const char* gname, at::IntArrayRef shape,
                     at::ScalarType dtype, const at::Tensor& of, const char* ofname) {
  TORCH_CHECK(grad.sizes() == shape, op, ": ", gname, " has shape ", shape_str(grad), ", expected ", shape,
              " (", ofname, ")");
  TORCH_CHECK(grad.scalar_type() == dtype, op, ": ", gname, " (", grad.scalar_type(),
              ") must have the dtype of ", ofname, " (", dtype, ")");
  check_same_device(grad, arg(op, gname).c_str(), of, "features");
}

}  // namespace

ChannelPoolInputs check_channel_pool_inputs(const at::Tensor& logits, const at::Tensor& features,
                                            const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(features.dim() == 3, kPadded, ": features must be [B, N, D], got shape ", shape_str(features));
  TORCH_CHECK(logits.dim() == 3, kPadded,
              ": logits must be [B, N, D] (one gate logit per row and channel), got shape ",
              shape_str(logits));
  check_logits_features(kPadded, logits, features);
  ChannelPoolInputs in;
  in.logits = logits;
  in.features = features;
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == features.size(0) && m.size(1) == features.size(1), kPadded,
                ": mask must be [B, N] = [", features.size(0), ", ", features.size(1), "] to match features ",
                shape_str(features), ", got shape ", shape_str(m));
    check_same_device(m, arg(kPadded, "mask").c_str(), features, "features");
    // checked here too so that the message names the op (as_bool_mask's own check cannot)
    TORCH_CHECK(!m.is_complex(), kPadded, ": mask must be a bool, integer or floating tensor, got ",
                m.scalar_type());
    in.mask = as_bool_mask(m);
  }
  return in;
}

ChannelPoolInputs check_channel_pool_packed_inputs(const at::Tensor& logits, const at::Tensor& features,
                                                   const at::Tensor& offsets) {
  TORCH_CHECK(features.dim() == 2, kPacked, ": features must be [T, D], got shape ", shape_str(features));
  TORCH_CHECK(logits.dim() == 2, kPacked,
              ": logits must be [T, D] (one gate logit per row and channel), got shape ", shape_str(logits));
  check_logits_features(kPacked, logits, features);
  ChannelPoolInputs in;
  in.logits = logits;
  in.features = features;
  in.offsets = check_offsets(offsets, features.size(0), features, kPacked, "features");
  return in;
}

ChannelPoolGrads check_channel_pool_grads(const at::Tensor& grad_pooled,
                                          const std::optional<at::Tensor>& grad_weights,
                                          const at::Tensor& pooled, const at::Tensor& weights,
                                          const at::Tensor& features,
                                          const std::optional<at::Tensor>& offsets) {
  const bool packed = offsets.has_value();
  const char* op =
      packed ? "_masked_channel_attention_pool_packed_backward" : "_masked_channel_attention_pool_backward";
  TORCH_CHECK(features.dim() == (packed ? 2 : 3), op, ": features must be ", packed ? "[T, D]" : "[B, N, D]",
              ", got shape ", shape_str(features));
  check_floating(features, arg(op, "features").c_str());
  TORCH_CHECK(weights.sizes() == features.sizes(), op, ": weights ", shape_str(weights),
              " must have the shape of features ", shape_str(features));
  TORCH_CHECK(weights.scalar_type() == features.scalar_type(), op, ": weights (", weights.scalar_type(),
              ") and features (", features.scalar_type(), ") must have the same dtype");
  check_same_device(weights, arg(op, "weights").c_str(), features, "features");
  ChannelPoolGrads g;
  int64_t B = features.size(0);
  if (packed) {
    g.offsets = check_offsets(*offsets, features.size(0), features, op, "features");
    B = g.offsets.size(0) - 1;
  }
  const int64_t D = features.size(-1);
  const std::vector<int64_t> pooled_shape{B, D};
  TORCH_CHECK(pooled.sizes() == at::IntArrayRef(pooled_shape), op, ": pooled has shape ", shape_str(pooled),
              ", expected [B, D] = ", at::IntArrayRef(pooled_shape),
              packed ? " (B = offsets.size(0) - 1)" : "");
  TORCH_CHECK(pooled.scalar_type() == features.scalar_type(), op, ": pooled (", pooled.scalar_type(),
              ") and features (", features.scalar_type(), ") must have the same dtype");
  check_same_device(pooled, arg(op, "pooled").c_str(), features, "features");
  check_grad_like(op, grad_pooled, "grad_pooled", pooled_shape, pooled.scalar_type(), features, "pooled");
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_grad_like(op, *grad_weights, "grad_weights", weights.sizes(), weights.scalar_type(), features,
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

TORCH_LIBRARY_FRAGMENT(maskattn, m) {
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
