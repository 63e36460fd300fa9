// Schemas of masked_softmax and its backward, and the argument checks every backend runs first.
#include "masked_softmax.h"

#include <torch/library.h>

#include <cmath>

#include "common/checks.h"

namespace maskattn {

RowLayout make_row_layout(const at::Tensor* ts, int ntensors) {
  const int64_t nd = ts[0].dim() - 1;  // outer dims
  RowLayout L;
  for (int t = 0; t < ntensors; ++t) L.inner[t] = ts[t].stride(nd);
  // Drop size-1 dims, then merge neighbours that every tensor walks as one (stride[i] ==
  // stride[i+1] * size[i+1]): a contiguous [B,H,N,N] becomes one dim of B*H*N rows, a [B,1,1,N]
  // mask expanded over it stays [B | H*N] with strides [N | 0].
  int n = 0;
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t s = ts[0].size(d);
    if (s == 1) continue;
    bool merge = n > 0;
    for (int t = 0; merge && t < ntensors; ++t) merge = L.stride[t][n - 1] == ts[t].stride(d) * s;
    if (merge) {
      L.size[n - 1] *= s;
      for (int t = 0; t < ntensors; ++t) L.stride[t][n - 1] = ts[t].stride(d);
      continue;
    }
    TORCH_CHECK(n < kMaxRowDims, "masked_softmax: scores has too many non-mergeable dims (more than ",
                kMaxRowDims, " after coalescing); make it contiguous first");
    L.size[n] = s;
    for (int t = 0; t < ntensors; ++t) L.stride[t][n] = ts[t].stride(d);
    ++n;
  }
  L.ndim = n;
  return L;
}

SoftmaxArgs check_masked_softmax(const at::Tensor& scores, const at::Tensor& mask, int64_t dim,
                                 double scale) {
  TORCH_CHECK(scores.dim() >= 1, "masked_softmax: scores must have at least one dim, got shape ",
              shape_str(scores));
  check_floating(scores, "masked_softmax: scores");
  TORCH_CHECK(!mask.is_complex(), "masked_softmax: mask must be a bool, integer or floating tensor, got ",
              mask.scalar_type());
  check_same_device(scores, "masked_softmax: scores", mask, "mask");
  TORCH_CHECK(std::isfinite(scale), "masked_softmax: scale must be finite, got ", scale);
  const int64_t nd = scores.dim();
  TORCH_CHECK(dim >= -nd && dim < nd, "masked_softmax: dim = ", dim, " is out of range for scores of shape ",
              shape_str(scores));
  bool ok = mask.dim() <= nd;
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    ok = mask.size(-i) == 1 || mask.size(-i) == scores.size(-i);
  }
  TORCH_CHECK(ok, "masked_softmax: mask of shape ", shape_str(mask),
              " does not broadcast to scores of shape ", shape_str(scores),
              " (sizes must match or be 1, aligned from the last dim)");
  SoftmaxArgs a;
  a.dim = dim < 0 ? dim + nd : dim;
  // Normalised before expanding, so a non-bool mask costs one pass over the small mask only.
  const at::Tensor m = as_bool_mask(mask).expand(scores.sizes());
  a.x = scores.movedim(a.dim, -1);
  a.y = m.movedim(a.dim, -1);
  a.N = scores.size(a.dim);
  a.rows = a.N == 0 ? 0 : scores.numel() / a.N;
  return a;
}

SoftmaxArgs check_masked_softmax_backward(const at::Tensor& grad_output, const at::Tensor& output,
                                          int64_t dim, double scale) {
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "_masked_softmax_backward: grad_output ",
              shape_str(grad_output), " must have the shape of output ", shape_str(output));
  TORCH_CHECK(grad_output.scalar_type() == output.scalar_type(), "_masked_softmax_backward: grad_output (",
              grad_output.scalar_type(), ") and output (", output.scalar_type(),
              ") must have the same dtype");
  check_floating(output, "_masked_softmax_backward: output");
  check_same_device(grad_output, "_masked_softmax_backward: grad_output", output, "output");
  const int64_t nd = output.dim();
  TORCH_CHECK(nd >= 1 && dim >= -nd && dim < nd, "_masked_softmax_backward: dim = ", dim,
              " is out of range for output of shape ", shape_str(output));
  TORCH_CHECK(std::isfinite(scale), "_masked_softmax_backward: scale must be finite, got ", scale);
  SoftmaxArgs a;
  a.dim = dim < 0 ? dim + nd : dim;
  a.x = grad_output.movedim(a.dim, -1);
  a.y = output.movedim(a.dim, -1);
  a.N = output.size(a.dim);
  a.rows = a.N == 0 ? 0 : output.numel() / a.N;
  return a;
}

}  // namespace maskattn

TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def("masked_softmax(Tensor scores, Tensor mask, int dim=-1, float scale=1.0) -> Tensor");
  m.def("_masked_softmax_backward(Tensor grad_output, Tensor output, int dim, float scale) -> Tensor");
}
