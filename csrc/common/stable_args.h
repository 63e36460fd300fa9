#pragma once
// Argument handling that several ops on the stable ABI share: packed-bag offsets, bool[2] output
// masks, and the accumulation-dtype copies of small operands.
#include <cstdint>
#include <vector>

#include "common/stable.h"

namespace maskattn {

// Packed-bag offsets: int64 [B+1] with 0 = offsets[0] <= ... <= offsets[B] = rows, on the device of
// `like`. Returned contiguous. The values are checked where that needs no device sync (CPU); CUDA
// kernels clamp every offset into [0, rows] instead, so that bad values cannot send a read or write
// out of bounds (they give unspecified bags, not a fault).
inline st::Tensor check_offsets(const st::Tensor& offsets, int64_t rows, const st::Tensor& like,
                                const char* op, const char* like_name) {
  MASKATTN_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
                 ": offsets must be 1-D [B+1] with B >= 0, got shape ", st::shape_str(offsets));
  MASKATTN_CHECK(offsets.scalar_type() == st::ScalarType::Long, op, ": offsets must be int64, got ",
                 st::dtype_str(offsets));
  st::check_same_device(offsets, op, "offsets", like, like_name);
  if (offsets.is_cpu()) {
    // Read through the stride, the ends first: a zero-stride view of 2^40 offsets is refused
    // (or found constant) in O(1), not copied or walked.
    const int64_t* d = offsets.const_data_ptr<int64_t>();
    const int64_t s = offsets.stride(0);
    auto p = [&](int64_t i) { return d[i * s]; };
    const int64_t nb = offsets.size(0) - 1;
    MASKATTN_CHECK(p(0) == 0, op, ": offsets[0] must be 0, got ", p(0));
    MASKATTN_CHECK(p(nb) == rows, op, ": offsets[-1] = ", p(nb), " must equal T = ", like_name,
                   ".size(0) = ", rows);
    for (int64_t b = 0; b < nb && s != 0; ++b) {
      MASKATTN_CHECK(p(b + 1) >= p(b), op, ": offsets must be non-decreasing, but offsets[", b + 1,
                     "] = ", p(b + 1), " < offsets[", b, "] = ", p(b));
    }
  }
  return offsets.is_contiguous() ? offsets : torch::stable::contiguous(offsets);
}

// t in the accumulation dtype `acc`, contiguous; t itself when it already is (no dispatcher call).
inline st::Tensor acc_contiguous(const st::Tensor& t, st::ScalarType acc) {
  const st::Tensor c = t.scalar_type() == acc ? t : torch::stable::to(t, acc);
  return c.is_contiguous() ? c : torch::stable::contiguous(c);
}

}  // namespace maskattn
