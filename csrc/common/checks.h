#pragma once
// Argument checks shared by every op and backend. Messages name the argument and the shapes or
// dtypes involved, because "expected 3 dims" alone leaves the user guessing which tensor is wrong.
#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace maskattn {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " (", a.device(), ") and ", bn, " (", b.device(),
              ") must be on the same device");
}

// Any mask dtype is accepted; kernels read one byte per element, so normalise once here.
// The mask is at most 1/D of the features, so this extra pass is negligible.
inline at::Tensor as_bool_mask(const at::Tensor& mask) {
  TORCH_CHECK(!mask.is_complex(), "mask must be a bool, integer or floating tensor, got ",
              mask.scalar_type());
  return mask.scalar_type() == at::kBool ? mask : mask.ne(0);
}

}  // namespace maskattn
