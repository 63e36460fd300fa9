#pragma once
#include <cstdint>

#include "common/stable.h"

namespace maskattn {
namespace cpu {

// st::empty for large contiguous CPU outputs (gradients the size of the features), backed by
// transparent huge pages where the kernel offers them (madvise mode). A fresh [B,N,D] buffer is
// first touched page by page; with 2 MiB pages that costs about a quarter of what 4 KiB pages do,
// and on small machines that first touch, not the arithmetic, dominates a backward that writes the
// buffer. Small sizes, other devices and non-Linux systems get a plain st::empty. `op` names the
// caller in the out-of-memory message.
st::Tensor empty_large(const int64_t* sizes, int64_t ndim, st::ScalarType dtype, const st::Device& device,
                       const char* op = "maskattn");

}  // namespace cpu
}  // namespace maskattn
