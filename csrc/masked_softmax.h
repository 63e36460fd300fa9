#pragma once
// Shape contract of masked_softmax and the row layout its kernels share.
//
// Every backend sees the op as a list of rows: `dim` is moved last (a view), the outer dims are
// coalesced, and each tensor keeps its own strides - a broadcast mask keeps stride 0 on the dims it
// is broadcast over, so a [B,1,1,N] key mask is never materialised at [B,H,N,N].
#include "common/stable.h"

namespace maskattn {

constexpr int kMaxRowDims = 12;

// Outer (row) dims after coalescing, with the strides of up to three tensors over them.
struct RowLayout {
  int ndim = 0;
  int64_t size[kMaxRowDims];
  int64_t stride[3][kMaxRowDims];
  int64_t inner[3];  // stride along the softmax dim
};

// Row-major row index -> element offset of that row's first element in tensor t.
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline void row_offsets(const RowLayout& L, int64_t row, int64_t* off, int ntensors) {
  for (int t = 0; t < ntensors; ++t) off[t] = 0;
  for (int d = L.ndim - 1; d >= 0; --d) {
    const int64_t s = L.size[d];
    const int64_t i = row % s;
    row /= s;
    for (int t = 0; t < ntensors; ++t) off[t] += i * L.stride[t][d];
  }
}

// Coalesced layout of views that all have the same shape [..., N] (softmax dim last).
RowLayout make_row_layout(const st::View* vs, int ntensors);

struct SoftmaxArgs {
  st::Tensor xt;  // scores (or grad_output)
  st::Tensor yt;  // the bool mask (forward) or output (backward)
  st::View x;     // xt with dim moved last; any strides
  st::View y;     // yt expanded to x's shape (forward), dim moved last
  int64_t dim;    // wrapped
  int64_t N;      // softmax length
  int64_t rows;   // product of the other dims
};

SoftmaxArgs check_masked_softmax(const st::Tensor& scores, const st::Tensor& mask, int64_t dim, double scale);
SoftmaxArgs check_masked_softmax_backward(const st::Tensor& grad_output, const st::Tensor& output,
                                          int64_t dim, double scale);

}  // namespace maskattn
