#pragma once
// What the ops built on PyTorch's stable ABI share: argument checks, allocation, and views done as
// stride arithmetic.
//
// Everything here compiles with TORCH_TARGET_VERSION set (2.11): only torch/csrc/stable and
// torch/headeronly are reachable, and every unstable header (ATen, c10, torch/library.h) refuses
// to compile in such a translation unit. Views (select, expand, movedim) are never asked of the
// dispatcher: a kernel needs a data pointer, sizes and strides, and computing those here costs
// nothing, where each boxed dispatcher call costs microseconds.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <vector>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace maskattn {
namespace st {

using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;

// STD_TORCH_CHECK prefixes the function name and the build machine's source path; users get the
// message alone, as TORCH_CHECK gives it (the dispatcher turns std::runtime_error into
// RuntimeError).
template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}

#define MASKATTN_CHECK(cond, ...)        \
  do {                                   \
    if (__builtin_expect(!(cond), 0)) {  \
      ::maskattn::st::fail(__VA_ARGS__); \
    }                                    \
  } while (0)

template <typename Sizes>
inline std::string sizes_str(const Sizes& s, int64_t n) {
  std::ostringstream os;
  os << '[';
  for (int64_t i = 0; i < n; ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

inline std::string shape_str(const Tensor& t) {
  const auto s = t.sizes();
  return sizes_str(s, static_cast<int64_t>(s.size()));
}

// c10::Device's spelling ("cpu", "cuda:0", "meta"), which users see in today's messages.
inline std::string device_str(const Device& d) {
  std::ostringstream os;
  switch (d.type()) {
    case torch::headeronly::DeviceType::CPU:
      os << "cpu";
      break;
    case torch::headeronly::DeviceType::CUDA:
      os << "cuda";
      break;
    case torch::headeronly::DeviceType::Meta:
      os << "meta";
      break;
    default:
      os << "device_type_" << static_cast<int>(d.type());
  }
  if (d.has_index()) os << ':' << d.index();
  return os.str();
}

inline bool is_complex(ScalarType s) {
  return s == ScalarType::ComplexHalf || s == ScalarType::ComplexFloat || s == ScalarType::ComplexDouble;
}

inline void check_floating(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  MASKATTN_CHECK(
      s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::Half || s == ScalarType::BFloat16,
      name, " must be float32, float64, float16 or bfloat16, got ", torch::headeronly::toString(s));
}

inline void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  const Device da = a.device(), db = b.device();
  MASKATTN_CHECK(da == db, an, " (", device_str(da), ") and ", bn, " (", device_str(db),
                 ") must be on the same device");
}

inline bool is_floating(ScalarType s) {
  return s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::Half ||
         s == ScalarType::BFloat16;
}

inline const char* dtype_str(const Tensor& t) {
  return torch::headeronly::toString(t.scalar_type());
}

// The variants that name the op (the backward ops and the later ops' checks use these).
inline void check_floating(const Tensor& t, const char* op, const char* name) {
  MASKATTN_CHECK(is_floating(t.scalar_type()), op, ": ", name,
                 " must be float32, float64, float16 or bfloat16, got ", dtype_str(t));
}

inline void check_same_device(const Tensor& a, const char* op, const char* an, const Tensor& b,
                              const char* bn) {
  const Device da = a.device(), db = b.device();
  MASKATTN_CHECK(da == db, op, ": ", an, " (", device_str(da), ") and ", bn, " (", device_str(db),
                 ") must be on the same device");
}

// A gradient (or a saved tensor) must have the dtype of the tensor it belongs to: the kernels read
// both through one element type.
inline void check_same_dtype(const Tensor& a, const char* op, const char* an, const Tensor& b,
                             const char* bn) {
  MASKATTN_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " (", dtype_str(a), ") and ", bn, " (",
                 dtype_str(b), ") must have the same dtype");
}

inline void check_mask_dtype(const Tensor& mask, const char* op, const char* name) {
  MASKATTN_CHECK(!is_complex(mask.scalar_type()), op, ": ", name,
                 " must be a bool, integer or floating tensor, got ", dtype_str(mask));
}

// A bool[N] argument arrives as a list of any length; the unstable API's conversion to
// std::array<bool, N> refused any other length with this message, and the kernels index every entry.
inline void check_output_mask(const std::vector<bool>& output_mask, size_t n = 2) {
  MASKATTN_CHECK(output_mask.size() == n, "Tried to convert a List with ", output_mask.size(),
                 " elements to a fixed-size array of size ", n);
}

// at::toOpMathType: half types compute in float32.
inline ScalarType acc_dtype(ScalarType s) {
  return (s == ScalarType::Half || s == ScalarType::BFloat16) ? ScalarType::Float : s;
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  const auto sa = a.sizes(), sb = b.sizes();
  if (sa.size() != sb.size()) return false;
  for (size_t i = 0; i < sa.size(); ++i)
    if (sa[i] != sb[i]) return false;
  return true;
}

// Half types accumulate in float32 (at::opmath_type is not header-only).
template <typename T>
struct acc_type {
  using type = T;
};
template <>
struct acc_type<c10::Half> {
  using type = float;
};
template <>
struct acc_type<c10::BFloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

// A new contiguous tensor. aoti_torch_empty_strided is one C call into at::empty_strided (the
// device's caching allocator on CUDA); torch::stable::empty would go through the boxed dispatcher.
inline Tensor empty(const int64_t* sizes, int64_t ndim, ScalarType dtype, const Device& device) {
  int64_t strides[16];
  MASKATTN_CHECK(ndim <= 16, "maskattn: tensors of more than 16 dims are not supported, got ", ndim);
  int64_t s = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = s;
    s *= sizes[d] > 1 ? sizes[d] : 1;
  }
  AtenTensorHandle h = nullptr;
  const int32_t dt = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const int32_t dev = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device.type()));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes, strides, dt, dev, device.index(), &h));
  return Tensor(h);
}

inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, const Device& device) {
  return empty(sizes.begin(), static_cast<int64_t>(sizes.size()), dtype, device);
}

// A new contiguous tensor of zeros: fill_ is a direct C shim call, zero_ a boxed dispatcher one.
inline Tensor zeros(const int64_t* sizes, int64_t ndim, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, ndim, dtype, device);
  torch::stable::fill_(t, 0.0);
  return t;
}

inline Tensor zeros(std::initializer_list<int64_t> sizes, ScalarType dtype, const Device& device) {
  return zeros(sizes.begin(), static_cast<int64_t>(sizes.size()), dtype, device);
}

// Any mask dtype is accepted; kernels read one byte per element, so normalise once. x.to(bool) is
// x != 0 for every real dtype (NaN is nonzero, -0.0 is zero), and the mask is at most 1/D of the
// features, so this extra pass is negligible.
// The caller has rejected complex masks with a message that names its op.
inline Tensor as_bool_mask(const Tensor& mask) {
  return mask.scalar_type() == ScalarType::Bool ? mask : torch::stable::to(mask, ScalarType::Bool);
}

// Sizes and strides of a tensor, reshaped by index arithmetic only; the tensor that owns the data
// stays alive in the caller.
constexpr int kMaxDims = 16;

struct View {
  int ndim = 0;
  int64_t size[kMaxDims];
  int64_t stride[kMaxDims];

  static View of(const Tensor& t) {
    View v;
    const auto sz = t.sizes();
    const auto st = t.strides();
    MASKATTN_CHECK(sz.size() <= static_cast<size_t>(kMaxDims),
                   "maskattn: tensors of more than 16 dims are not supported, got ", sz.size());
    v.ndim = static_cast<int>(sz.size());
    for (int d = 0; d < v.ndim; ++d) {
      v.size[d] = sz[d];
      v.stride[d] = st[d];
    }
    return v;
  }

  // Tensor.select(d, 0) for a size-1 dim: the dim is dropped, the data pointer does not move.
  View drop(int d) const {
    View v;
    v.ndim = ndim - 1;
    for (int i = 0, j = 0; i < ndim; ++i) {
      if (i == d) continue;
      v.size[j] = size[i];
      v.stride[j] = stride[i];
      ++j;
    }
    return v;
  }

  // Tensor.expand(sizes) for a view that broadcasts to `to` (checked by the caller): new and
  // broadcast dims get stride 0.
  View expand(const View& to) const {
    View v;
    v.ndim = to.ndim;
    const int lead = to.ndim - ndim;
    for (int d = 0; d < to.ndim; ++d) {
      v.size[d] = to.size[d];
      const int s = d - lead;
      v.stride[d] = (s < 0 || size[s] != to.size[d]) ? 0 : stride[s];
    }
    return v;
  }

  // Tensor.unsqueeze(d): a size-1 dim, with the stride torch gives it.
  View insert(int d) const {
    View v;
    v.ndim = ndim + 1;
    for (int i = 0, j = 0; i < v.ndim; ++i) {
      if (i == d) {
        v.size[i] = 1;
        v.stride[i] = d < ndim ? size[d] * stride[d] : 1;
        continue;
      }
      v.size[i] = size[j];
      v.stride[i] = stride[j];
      ++j;
    }
    return v;
  }

  // Tensor.movedim(d, -1).
  View move_last(int d) const {
    View v = *this;
    for (int i = d; i + 1 < ndim; ++i) {
      v.size[i] = size[i + 1];
      v.stride[i] = stride[i + 1];
    }
    v.size[ndim - 1] = size[d];
    v.stride[ndim - 1] = stride[d];
    return v;
  }
};

// A tensor for a View of t's data (same storage, same first element), for the rare path that hands
// a view to an ATen op (a copy). One C call, where a chain of select/expand/movedim would be one
// boxed dispatcher call each.
inline Tensor as_strided(const Tensor& t, const View& v) {
  AtenTensorHandle h = nullptr;
  // The shim's offset argument is added to t's own storage offset (at::_reinterpret_tensor's
  // offset_increment): 0 keeps the first element.
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(t.get(), v.ndim, v.size, v.stride, 0, &h));
  return Tensor(h);
}

}  // namespace st
}  // namespace maskattn
