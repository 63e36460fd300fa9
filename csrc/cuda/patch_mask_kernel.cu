// CUDA kernel of patch_mask: one thread per patch counts its p x p pixels, reading the image mask
// once in its own dtype. Neighbouring threads read neighbouring patches of the same pixel rows, so
// every mask sector is fetched from DRAM once and the rest of the warp finds it in L1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "patch_mask.h"

namespace maskattn {
namespace {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<bool> {
  using type = uint8_t;  // a nonzero byte is a valid pixel
};

// Half types compare through float: torch builds device code without c10::Half operators.
template <typename S>
__device__ __forceinline__ bool nonzero(S v) {
  if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>) {
    return static_cast<float>(v) != 0.0f;
  } else {
    return v != S(0);
  }
}

template <typename S>
__global__ void patch_mask_kernel(const S* __restrict__ m, bool* __restrict__ out, int64_t total, int64_t nh,
                                  int64_t nw, int64_t p, int64_t sb, int64_t sh, int64_t sw,
                                  int64_t min_count) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t j = t % nw, bi = t / nw;
    const int64_t i = bi % nh, b = bi / nh;
    const S* base = m + b * sb + i * p * sh + j * p * sw;
    int64_t c = 0;
    for (int64_t r = 0; r < p; ++r) {
      const S* row = base + r * sh;
      for (int64_t k = 0; k < p; ++k) c += nonzero(row[k * sw]);
    }
    out[t] = c >= min_count;
  }
}

at::Tensor patch_mask_cuda(const at::Tensor& image_mask, int64_t patch_size, double threshold) {
  const PatchMaskInputs in = check_patch_mask_inputs(image_mask, patch_size, threshold);
  const c10::cuda::CUDAGuard guard(image_mask.device());
  const int64_t B = in.mask.size(0);
  auto out = at::empty({B, in.nh * in.nw}, image_mask.options().dtype(at::kBool));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t min_count = patch_min_count(patch_size, threshold);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(total, threads), int64_t(1) << 20);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor& m = in.mask;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "patch_mask_cuda", [&] {
    using S = typename Storage<scalar_t>::type;
    patch_mask_kernel<S><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<const S*>(m.const_data_ptr<scalar_t>()), out.data_ptr<bool>(), total, in.nh, in.nw,
        in.p, m.stride(0), m.stride(1), m.stride(2), min_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace maskattn

TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("patch_mask", &maskattn::patch_mask_cuda);
}
