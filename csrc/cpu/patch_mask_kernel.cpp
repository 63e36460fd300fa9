// CPU kernel of patch_mask: counts the valid pixels of every p x p patch in one streaming pass over
// the image mask, in its own dtype (no float copy, no bool copy), row by row of pixels.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/stable.h"
#include "patch_mask.h"

namespace maskattn {
namespace {

// Valid pixels in n consecutive elements starting at x (element stride s). The total is int64: a
// patch of p x p pixels holds more than 2^31 of them from p = 46341 on. Runs of at most 2^30
// elements are counted in int32, which the compiler vectorises best over bytes.
template <typename T>
inline int64_t count_valid(const T* __restrict__ x, int64_t n, int64_t s) {
  constexpr int64_t kRun = int64_t(1) << 30;
  int64_t total = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kRun) {
    const int64_t k1 = std::min(n, k0 + kRun);
    int32_t c = 0;
    if (s == 1) {
      for (int64_t k = k0; k < k1; ++k) c += x[k] != T(0);
    } else {
      for (int64_t k = k0; k < k1; ++k) c += x[k * s] != T(0);
    }
    total += c;
  }
  return total;
}

// bool is read as its byte: a nonzero byte is a valid pixel, which is what comparing to false does,
// but on uint8_t the compiler vectorises the count.
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<bool> {
  using type = uint8_t;
};

template <typename T>
void patch_mask_kernel(const void* data, const PatchMaskInputs& in, int64_t min_count, bool* out) {
  using S = typename Storage<T>::type;
  const S* base = static_cast<const S*>(data);
  const st::View& m = in.mask;
  const int64_t B = m.size[0], p = in.p, nh = in.nh, nw = in.nw;
  const int64_t sb = m.stride[0], sh = m.stride[1], sw = m.stride[2];
  // One task = one row of patches: p pixel rows, W * p pixels.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p * p * nw));
  torch::stable::parallel_for(0, B * nh, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> cnt(nw);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nh, i = t % nh;
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t r = 0; r < p; ++r) {
        const S* row = base + b * sb + (i * p + r) * sh;
        for (int64_t j = 0; j < nw; ++j) cnt[j] += count_valid(row + j * p * sw, p, sw);
      }
      bool* o = out + b * nh * nw + i * nw;
      for (int64_t j = 0; j < nw; ++j) o[j] = cnt[j] >= min_count;
    }
  });
}

st::Tensor patch_mask_cpu(const st::Tensor& image_mask, int64_t patch_size, double threshold) {
  const PatchMaskInputs in = check_patch_mask_inputs(image_mask, patch_size, threshold);
  const int64_t sizes[2] = {in.mask.size[0], in.nh * in.nw};
  st::Tensor out = st::empty(sizes, 2, st::ScalarType::Bool, image_mask.device());
  if (out.numel() == 0) return out;
  const int64_t min_count = patch_min_count(patch_size, threshold);
  const void* data = image_mask.const_data_ptr();
  bool* o = out.mutable_data_ptr<bool>();
  THO_DISPATCH_V2(image_mask.scalar_type(), "patch_mask_cpu",
                  AT_WRAP([&] { patch_mask_kernel<scalar_t>(data, in, min_count, o); }),
                  AT_EXPAND(AT_ALL_TYPES), st::ScalarType::Bool, st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return out;
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("patch_mask", TORCH_BOX(&maskattn::patch_mask_cpu));
}
