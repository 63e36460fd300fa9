#pragma once
#include <ATen/ATen.h>

namespace maskattn {
namespace cpu {

// at::empty for large CPU outputs (gradients the size of the features), backed by transparent
// huge pages where the kernel offers them (madvise mode). A fresh [B,N,D] buffer is first touched
// page by page; with 2 MiB pages that costs about a quarter of what 4 KiB pages do, and on small
// machines that first touch, not the arithmetic, dominates a backward that writes the buffer.
// Small sizes and non-Linux systems get a plain at::empty.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace maskattn
