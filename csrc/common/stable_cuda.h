#pragma once
// CUDA side of the stable-ABI helpers: the current stream, the device guard and the launch check.
// USE_CUDA must be defined before the shim headers for their CUDA entry points to be declared
// (the build defines it for the CUDA build of the op library).
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include "common/stable.h"

#ifndef USE_CUDA
#error "common/stable_cuda.h needs USE_CUDA (the CUDA shims of libtorch_cuda)"
#endif

namespace maskattn {
namespace st {

// The stream PyTorch would launch on (CUDA graphs capture only that one). accelerator's
// getCurrentStream(...).nativeHandle() needs torch 2.13; this AOTI shim has been there since 2.4.
inline cudaStream_t current_stream(int32_t device_index) {
  void* s = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &s));
  return static_cast<cudaStream_t>(s);
}

using torch::stable::accelerator::DeviceGuard;

}  // namespace st
}  // namespace maskattn

// c10's C10_CUDA_KERNEL_LAUNCH_CHECK through the stable shim: the message carries the CUDA error
// and, where enabled, the device-side assertion.
#define MASKATTN_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()
