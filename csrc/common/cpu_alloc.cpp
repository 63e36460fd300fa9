#include "common/cpu_alloc.h"

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace maskattn {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

void free_huge(void* p) {
  std::free(p);
}

// Bytes per element of the dtypes whose gradients come through here (the floating ones); 0 for
// any other, which then takes the plain allocation.
size_t element_size(st::ScalarType s) {
  switch (s) {
    case st::ScalarType::Double:
      return 8;
    case st::ScalarType::Float:
      return 4;
    case st::ScalarType::Half:
    case st::ScalarType::BFloat16:
      return 2;
    default:
      return 0;
  }
}

}  // namespace

st::Tensor empty_large(const int64_t* sizes, int64_t ndim, st::ScalarType dtype, const st::Device& device,
                       const char* op) {
#if defined(__linux__)
  int64_t numel = 1;
  for (int64_t d = 0; d < ndim; ++d) numel *= sizes[d];
  const size_t bytes = static_cast<size_t>(numel) * element_size(dtype);
  if (device.type() == torch::headeronly::DeviceType::CPU && bytes >= 4 * kHugePage) {
    // No stable c10::Allocator exists: the buffer is handed over with its deleter (from_blob,
    // torch 2.11), so this storage, unlike an at::empty one, cannot be resized in place.
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    MASKATTN_CHECK(posix_memalign(&p, kHugePage, rounded) == 0 && p != nullptr, op,
                   ": out of memory allocating ", bytes, " bytes on the CPU");
#if defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: without THP support this is a no-op
#endif
    int64_t strides[st::kMaxDims];
    int64_t s = 1;
    for (int64_t d = ndim - 1; d >= 0; --d) {
      strides[d] = s;
      s *= sizes[d] > 1 ? sizes[d] : 1;
    }
    try {
      return torch::stable::from_blob(p, torch::headeronly::IntHeaderOnlyArrayRef(sizes, ndim),
                                      torch::headeronly::IntHeaderOnlyArrayRef(strides, ndim), device, dtype,
                                      &free_huge);
    } catch (...) {
      std::free(p);
      throw;
    }
  }
#endif
  return st::empty(sizes, ndim, dtype, device);
}

}  // namespace cpu
}  // namespace maskattn
