#include "common/cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

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

// An allocator (rather than from_blob with a deleter) so the tensor's storage stays resizable and
// behaves like any other CPU tensor's.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_huge, c10::Device(c10::kCPU)};
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0 || p == nullptr) {
      TORCH_CHECK(false, "maskattn: out of memory allocating ", n, " bytes on the CPU");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: without THP support this is a no-op
#endif
    return {p, p, &free_huge, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_huge; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_allocator;

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
#if defined(__linux__)
  if (options.device().is_cpu() && bytes >= 4 * kHugePage) {
    return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace maskattn
