// Schemas of masked_softmax and its backward, and the argument checks every backend runs first.
#include "masked_softmax.h"

#include <cmath>

namespace maskattn {

RowLayout make_row_layout(const st::View* vs, int ntensors) {
  const int nd = vs[0].ndim - 1;  // outer dims
  RowLayout L;
  for (int t = 0; t < ntensors; ++t) L.inner[t] = vs[t].stride[nd];
  // Drop size-1 dims, then merge neighbours that every tensor walks as one (stride[i] ==
  // stride[i+1] * size[i+1]): a contiguous [B,H,N,N] becomes one dim of B*H*N rows, a [B,1,1,N]
  // mask expanded over it stays [B | H*N] with strides [N | 0].
  int n = 0;
  for (int d = 0; d < nd; ++d) {
    const int64_t s = vs[0].size[d];
    if (s == 1) continue;
    bool merge = n > 0;
    for (int t = 0; merge && t < ntensors; ++t) merge = L.stride[t][n - 1] == vs[t].stride[d] * s;
    if (merge) {
      L.size[n - 1] *= s;
      for (int t = 0; t < ntensors; ++t) L.stride[t][n - 1] = vs[t].stride[d];
      continue;
    }
    MASKATTN_CHECK(n < kMaxRowDims, "masked_softmax: scores has too many non-mergeable dims (more than ",
                   kMaxRowDims, " after coalescing); make it contiguous first");
    L.size[n] = s;
    for (int t = 0; t < ntensors; ++t) L.stride[t][n] = vs[t].stride[d];
    ++n;
  }
  L.ndim = n;
  return L;
}

SoftmaxArgs check_masked_softmax(const st::Tensor& scores, const st::Tensor& mask, int64_t dim,
                                 double scale) {
  const st::View sv = st::View::of(scores);
  MASKATTN_CHECK(sv.ndim >= 1, "masked_softmax: scores must have at least one dim, got shape ",
                 st::shape_str(scores));
  st::check_floating(scores, "masked_softmax: scores");
  st::check_mask_dtype(mask, "masked_softmax", "mask");
  st::check_same_device(scores, "masked_softmax: scores", mask, "mask");
  MASKATTN_CHECK(std::isfinite(scale), "masked_softmax: scale must be finite, got ", scale);
  const int64_t nd = sv.ndim;
  MASKATTN_CHECK(dim >= -nd && dim < nd, "masked_softmax: dim = ", dim,
                 " is out of range for scores of shape ", st::shape_str(scores));
  const st::View mv = st::View::of(mask);
  bool ok = mv.ndim <= nd;
  for (int i = 1; ok && i <= mv.ndim; ++i) {
    ok = mv.size[mv.ndim - i] == 1 || mv.size[mv.ndim - i] == sv.size[nd - i];
  }
  MASKATTN_CHECK(ok, "masked_softmax: mask of shape ", st::shape_str(mask),
                 " does not broadcast to scores of shape ", st::shape_str(scores),
                 " (sizes must match or be 1, aligned from the last dim)");
  SoftmaxArgs a{scores, st::as_bool_mask(mask)};
  a.dim = dim < 0 ? dim + nd : dim;
  // Normalised before expanding, so a non-bool mask costs one pass over the small mask only; the
  // expansion itself is strides only.
  a.x = sv.move_last(static_cast<int>(a.dim));
  a.y = st::View::of(a.yt).expand(sv).move_last(static_cast<int>(a.dim));
  a.N = sv.size[a.dim];
  a.rows = a.N == 0 ? 0 : scores.numel() / a.N;
  return a;
}

SoftmaxArgs check_masked_softmax_backward(const st::Tensor& grad_output, const st::Tensor& output,
                                          int64_t dim, double scale) {
  MASKATTN_CHECK(grad_output.sizes() == output.sizes(), "_masked_softmax_backward: grad_output ",
                 st::shape_str(grad_output), " must have the shape of output ", st::shape_str(output));
  st::check_same_dtype(grad_output, "_masked_softmax_backward", "grad_output", output, "output");
  st::check_floating(output, "_masked_softmax_backward: output");
  st::check_same_device(grad_output, "_masked_softmax_backward: grad_output", output, "output");
  const st::View ov = st::View::of(output);
  const int64_t nd = ov.ndim;
  MASKATTN_CHECK(nd >= 1 && dim >= -nd && dim < nd, "_masked_softmax_backward: dim = ", dim,
                 " is out of range for output of shape ", st::shape_str(output));
  MASKATTN_CHECK(std::isfinite(scale), "_masked_softmax_backward: scale must be finite, got ", scale);
  SoftmaxArgs a{grad_output, output};
  a.dim = dim < 0 ? dim + nd : dim;
  a.x = st::View::of(grad_output).move_last(static_cast<int>(a.dim));
  a.y = ov.move_last(static_cast<int>(a.dim));
  a.N = ov.size[a.dim];
  a.rows = a.N == 0 ? 0 : output.numel() / a.N;
  return a;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def("masked_softmax(Tensor scores, Tensor mask, int dim=-1, float scale=1.0) -> Tensor");
  m.def("_masked_softmax_backward(Tensor grad_output, Tensor output, int dim, float scale) -> Tensor");
}
