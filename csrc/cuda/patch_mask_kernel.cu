// CUDA kernel of patch_mask: one thread per patch counts its p x p pixels, reading the image mask
// once in its own dtype. Neighbouring threads read neighbouring patches of the same pixel rows, so
// every mask sector is fetched from DRAM once and the rest of the warp finds it in L1.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
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

// Half types compare through float.
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

// A launch of its own: the commas of <<<...>>> would split THO_DISPATCH_V2's body argument.
template <typename S>
void launch(const void* data, const PatchMaskInputs& in, int64_t min_count, bool* out, int64_t total,
            cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(total, threads), int64_t(1) << 20);
  const st::View& m = in.mask;
  patch_mask_kernel<S><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const S*>(data), out, total, in.nh, in.nw, in.p, m.stride[0], m.stride[1], m.stride[2],
      min_count);
  MASKATTN_CUDA_LAUNCH_CHECK();
}

st::Tensor patch_mask_cuda(const st::Tensor& image_mask, int64_t patch_size, double threshold) {
  const PatchMaskInputs in = check_patch_mask_inputs(image_mask, patch_size, threshold);
  const int32_t dev = image_mask.get_device_index();
  const st::DeviceGuard guard(dev);
  const int64_t sizes[2] = {in.mask.size[0], in.nh * in.nw};
  st::Tensor out = st::empty(sizes, 2, st::ScalarType::Bool, image_mask.device());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t min_count = patch_min_count(patch_size, threshold);
  const cudaStream_t stream = st::current_stream(dev);
  const void* data = image_mask.const_data_ptr();
  bool* o = out.mutable_data_ptr<bool>();
  THO_DISPATCH_V2(
      image_mask.scalar_type(), "patch_mask_cuda",
      AT_WRAP([&] { launch<typename Storage<scalar_t>::type>(data, in, min_count, o, total, stream); }),
      AT_EXPAND(AT_ALL_TYPES), st::ScalarType::Bool, st::ScalarType::Half, st::ScalarType::BFloat16);
  return out;
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("patch_mask", TORCH_BOX(&maskattn::patch_mask_cuda));
}
