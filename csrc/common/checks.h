#pragma once
// Argument checks shared by every op and backend. Messages name the op, the argument and the shapes
// or dtypes involved, because "expected 3 dims" alone leaves the user guessing which tensor is wrong.
// The backward ops are public entry points too (torch.ops.maskattn._*_backward): they run the same
// kind of checks on every tensor they read, since their kernels index with the sizes they are given.
#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace maskattn {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline bool is_floating(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_floating(t), name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_floating(t), op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " (", a.device(), ") and ", bn, " (", b.device(),
              ") must be on the same device");
}

inline void check_same_device(const at::Tensor& a, const char* op, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " (", a.device(), ") and ", bn, " (", b.device(),
              ") must be on the same device");
}

// A gradient (or a saved tensor) must have the dtype of the tensor it belongs to: the kernels read
// both through one element type.
inline void check_same_dtype(const at::Tensor& a, const char* op, const char* an, const at::Tensor& b,
                             const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " (", a.scalar_type(), ") and ", bn, " (",
              b.scalar_type(), ") must have the same dtype");
}

inline void check_mask_dtype(const at::Tensor& mask, const char* op, const char* name) {
  TORCH_CHECK(!mask.is_complex(), op, ": ", name, " must be a bool, integer or floating tensor, got ",
              mask.scalar_type());
}

// Any mask dtype is accepted; kernels read one byte per element, so normalise once here.
// The mask is at most 1/D of the features, so this extra pass is negligible.
inline at::Tensor as_bool_mask(const at::Tensor& mask) {
  TORCH_CHECK(!mask.is_complex(), "mask must be a bool, integer or floating tensor, got ",
              mask.scalar_type());
  return mask.scalar_type() == at::kBool ? mask : mask.ne(0);
}

// Packed-bag offsets: int64 [B+1] with 0 = offsets[0] <= ... <= offsets[B] = rows, on the device of
// `like`. Returned contiguous. The values are checked where that needs no device sync (CPU); CUDA
// kernels clamp every offset into [0, rows] instead, so that bad values cannot send a read or write
// out of bounds (they give unspecified bags, not a fault).
inline at::Tensor check_offsets(const at::Tensor& offsets, int64_t rows, const at::Tensor& like,
                                const char* op, const char* like_name) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be 1-D [B+1] with B >= 0, got shape ", shape_str(offsets));
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  check_same_device(offsets, op, "offsets", like, like_name);
  if (offsets.is_cpu()) {
    // Read through the strides, the ends first: a zero-stride view of 2^40 offsets is refused
    // (or found constant) in O(1), not copied or walked.
    const auto p = offsets.accessor<int64_t, 1>();
    const int64_t nb = offsets.size(0) - 1;
    TORCH_CHECK(p[0] == 0, op, ": offsets[0] must be 0, got ", p[0]);
    TORCH_CHECK(p[nb] == rows, op, ": offsets[-1] = ", p[nb], " must equal T = ", like_name,
                ".size(0) = ", rows);
    for (int64_t b = 0; b < nb && offsets.stride(0) != 0; ++b) {
      TORCH_CHECK(p[b + 1] >= p[b], op, ": offsets must be non-decreasing, but offsets[", b + 1,
                  "] = ", p[b + 1], " < offsets[", b, "] = ", p[b]);
    }
  }
  at::Tensor o = offsets.contiguous();
  return o;
}

}  // namespace maskattn
