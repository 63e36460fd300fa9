#pragma once
// CUDA side of the stable-ABI helpers: the current stream, the device guard and the launch check.
// USE_CUDA must be defined before the shim headers for their CUDA entry points to be declared
// (the build defines it for the CUDA build of the op library).
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <atomic>

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

// cudaDevAttrMultiProcessorCount of a device, cached per device (the stable ABI has no
// getCurrentDeviceProperties; the attribute query is a driver call, too slow for every launch).
inline int sm_count(int32_t device_index) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached];
  const bool cached = device_index >= 0 && device_index < kCached;
  if (cached) {
    const int n = cache[device_index].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device_index);
  MASKATTN_CHECK(
      err == cudaSuccess,
      "maskattn: cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) failed: ", cudaGetErrorString(err));
  if (cached) cache[device_index].store(n, std::memory_order_relaxed);
  return n;
}

using torch::stable::accelerator::DeviceGuard;

}  // namespace st
}  // namespace maskattn

// c10's C10_CUDA_KERNEL_LAUNCH_CHECK through the stable shim: the message carries the CUDA error
// and, where enabled, the device-side assertion.
#define MASKATTN_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()
