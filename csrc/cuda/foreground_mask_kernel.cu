// CUDA kernels of foreground_mask.
//
// The pointwise (grey + threshold), morphology and Gaussian stages run on the GPU, one thread per
// pixel of the whole batch. The connected-component stage (largest 8-connected component + hole
// filling) runs on the host: the binary masks (B*H*W bytes, 3 MB for 48 crops of 256x256) are
// copied to the CPU, labelled there by the same run-based union-find as the CPU backend (parallel
// over the batch) and copied back. That copy synchronises the stream; it is documented in
// maskattn.masks.content_based. Results are identical to the CPU backend's.
#include <algorithm>

#include "common/stable_cuda.h"
#include "foreground_mask.h"

namespace maskattn {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTaps = 2 * 60 + 1;  // sigma <= 20 -> radius <= 60

struct Taps {
  float w[kMaxTaps];
  int r;
};

struct Channels {
  double w[4];  // luma weights for C = 3, 4; other C use the mean
};

int64_t grid_for(int64_t n) {
  return std::min<int64_t>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads), 1 << 20);
}

// Grey level >= cut, by the rule of foreground_mask.h (float64, each product and sum rounded on
// its own, in channel order): the _rn intrinsics are never contracted into an FMA, so the binary
// mask is bit-identical to the CPU's.
template <typename scalar_t>
__global__ void threshold_kernel(const scalar_t* __restrict__ im, int64_t s0, int64_t s1, int64_t s2,
                                 int64_t s3, int64_t C, int64_t H, int64_t W, Channels cw, double cut,
                                 int64_t total, uint8_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W, y = (i / W) % H, b = i / (H * W);
    const scalar_t* p = im + b * s0 + y * s2 + x * s3;
    double g;
    if (C == 1) {
      g = static_cast<double>(p[0]);
    } else if (C == 3 || C == 4) {
      g = __dmul_rn(cw.w[0], static_cast<double>(p[0]));
      g = __dadd_rn(g, __dmul_rn(cw.w[1], static_cast<double>(p[s1])));
      g = __dadd_rn(g, __dmul_rn(cw.w[2], static_cast<double>(p[2 * s1])));  // alpha (c = 3) ignored
    } else {
      g = static_cast<double>(p[0]);
      for (int64_t c = 1; c < C; ++c) g = __dadd_rn(g, static_cast<double>(p[c * s1]));
      g = __ddiv_rn(g, static_cast<double>(C));
    }
    out[i] = g >= cut;
  }
}

// Min/max over a (2r+1) segment along x (kAlongX) or y, clipped to the image: pixels outside do not
// count, as on the CPU (OpenCV's default morphology border).
template <bool kMax, bool kAlongX>
__global__ void morph_pass_kernel(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t H,
                                  int64_t W, int r, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W, y = (i / W) % H;
    const int64_t n = kAlongX ? W : H, pos = kAlongX ? x : y, step = kAlongX ? 1 : W;
    const int64_t lo = pos - r < 0 ? int64_t(0) : pos - r, hi = pos + r > n - 1 ? n - 1 : pos + r;
    const uint8_t* base = in + i - pos * step;
    uint8_t v = kMax ? 0 : 1;
    for (int64_t k = lo; k <= hi; ++k) v = kMax ? (v | base[k * step]) : (v & base[k * step]);
    out[i] = v;
  }
}

__device__ __forceinline__ int64_t reflect101(int64_t i, int64_t n) {
  if (n == 1) return 0;
  while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
  return i;
}

// One separable Gaussian pass (reflect-101 border, as cv2.GaussianBlur) along x or y.
template <typename in_t, bool kAlongX>
__global__ void gauss_pass_kernel(const in_t* __restrict__ in, float* __restrict__ out, int64_t H, int64_t W,
                                  Taps t, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W, y = (i / W) % H;
    const int64_t n = kAlongX ? W : H, pos = kAlongX ? x : y, step = kAlongX ? 1 : W;
    const in_t* base = in + i - pos * step;
    float s = 0.f;
    for (int k = -t.r; k <= t.r; ++k)
      s += t.w[k + t.r] * static_cast<float>(base[reflect101(pos + k, n) * step]);
    // the weights sum to 1 only up to rounding; the mask must stay in [0, 1]
    out[i] = kAlongX ? s : fminf(1.f, fmaxf(0.f, s));
  }
}

__global__ void to_float_kernel(const uint8_t* __restrict__ in, float* __restrict__ out, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(in[i]);
  }
}

template <bool kMax>
void morph(st::Tensor& bin, st::Tensor& tmp, int64_t H, int64_t W, int r, cudaStream_t stream) {
  if (r <= 0) return;
  const int64_t total = bin.numel();
  morph_pass_kernel<kMax, true><<<grid_for(total), kThreads, 0, stream>>>(
      bin.const_data_ptr<uint8_t>(), tmp.mutable_data_ptr<uint8_t>(), H, W, r, total);
  MASKATTN_CUDA_LAUNCH_CHECK();
  morph_pass_kernel<kMax, false><<<grid_for(total), kThreads, 0, stream>>>(
      tmp.const_data_ptr<uint8_t>(), bin.mutable_data_ptr<uint8_t>(), H, W, r, total);
  MASKATTN_CUDA_LAUNCH_CHECK();
}

// A launch of its own: the commas of <<<...>>> would split THO_DISPATCH_V2's body argument.
template <typename scalar_t>
void launch_threshold(const void* data, const st::View& im, const Channels& cw, double cut, uint8_t* bin,
                      cudaStream_t stream) {
  const int64_t C = im.size[1], H = im.size[2], W = im.size[3];
  const int64_t total = im.size[0] * H * W;
  threshold_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(data), im.stride[0], im.stride[1], im.stride[2], im.stride[3], C, H, W, cw,
      cut, total, bin);
  MASKATTN_CUDA_LAUNCH_CHECK();
}

std::tuple<st::Tensor, st::Tensor> foreground_mask_cuda(const st::Tensor& images, double threshold,
                                                        int64_t open_radius, int64_t close_radius,
                                                        bool fill_holes, double sigma) {
  const ForegroundParams prm{threshold, open_radius, close_radius, fill_holes, sigma};
  const st::View im = check_foreground_inputs(images, prm);
  const int32_t dev = images.get_device_index();
  const st::DeviceGuard guard(dev);
  const int64_t B = im.size[0], C = im.size[1], H = im.size[2], W = im.size[3];
  const st::Device device = images.device();
  const int64_t sizes[3] = {B, H, W};
  st::Tensor mask = st::empty(sizes, 3, st::ScalarType::Float, device);
  st::Tensor coverage = st::empty(&B, 1, st::ScalarType::Float, device);
  if (B == 0) return {mask, coverage};
  if (H == 0 || W == 0) {
    torch::stable::zero_(coverage);
    return {mask, coverage};
  }
  const cudaStream_t stream = st::current_stream(dev);
  const int64_t total = B * H * W;
  st::Tensor bin = st::empty(sizes, 3, st::ScalarType::Byte, device);
  st::Tensor tmp = st::empty(sizes, 3, st::ScalarType::Byte, device);
  Channels cw{};
  if (C == 3 || C == 4) grey_weights(C, cw.w);
  const double cut = foreground_cut(threshold, images.scalar_type() == st::ScalarType::Byte ? 255.0 : 1.0);

  const void* data = images.const_data_ptr();
  uint8_t* bp = bin.mutable_data_ptr<uint8_t>();
  THO_DISPATCH_V2(images.scalar_type(), "foreground_mask_cuda",
                  AT_WRAP([&] { launch_threshold<scalar_t>(data, im, cw, cut, bp, stream); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Byte, st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  morph<false>(bin, tmp, H, W, static_cast<int>(open_radius), stream);  // opening
  morph<true>(bin, tmp, H, W, static_cast<int>(open_radius), stream);
  morph<true>(bin, tmp, H, W, static_cast<int>(close_radius), stream);  // closing
  morph<false>(bin, tmp, H, W, static_cast<int>(close_radius), stream);

  // Connected components on the host (see the file comment): D2H, label, H2D.
  const st::Device cpu(torch::headeronly::DeviceType::CPU);
  st::Tensor host = torch::stable::to(bin, cpu);
  st::Tensor host_cov = st::empty(&B, 1, st::ScalarType::Float, cpu);
  largest_component_cpu(host.mutable_data_ptr<uint8_t>(), B, H, W, fill_holes,
                        host_cov.mutable_data_ptr<float>());
  torch::stable::copy_(bin, host);
  torch::stable::copy_(coverage, host_cov);

  const std::vector<float> gw = gaussian_weights(sigma);
  Taps t{};
  t.r = static_cast<int>(gw.size() / 2);
  MASKATTN_CHECK(static_cast<int>(gw.size()) <= kMaxTaps, "foreground_mask: sigma ", sigma,
                 " needs too many taps");
  std::copy(gw.begin(), gw.end(), t.w);
  if (t.r == 0) {
    to_float_kernel<<<grid_for(total), kThreads, 0, stream>>>(bin.const_data_ptr<uint8_t>(),
                                                              mask.mutable_data_ptr<float>(), total);
    MASKATTN_CUDA_LAUNCH_CHECK();
    return {mask, coverage};
  }
  st::Tensor ftmp = st::empty(sizes, 3, st::ScalarType::Float, device);
  gauss_pass_kernel<uint8_t, true><<<grid_for(total), kThreads, 0, stream>>>(
      bin.const_data_ptr<uint8_t>(), ftmp.mutable_data_ptr<float>(), H, W, t, total);
  MASKATTN_CUDA_LAUNCH_CHECK();
  gauss_pass_kernel<float, false><<<grid_for(total), kThreads, 0, stream>>>(
      ftmp.const_data_ptr<float>(), mask.mutable_data_ptr<float>(), H, W, t, total);
  MASKATTN_CUDA_LAUNCH_CHECK();
  return {mask, coverage};
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("foreground_mask", TORCH_BOX(&maskattn::foreground_mask_cuda));
}
