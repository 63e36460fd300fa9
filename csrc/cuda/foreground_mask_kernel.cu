// CUDA kernels of foreground_mask.
//
// The pointwise (grey + threshold), morphology and Gaussian stages run on the GPU, one thread per
// pixel of the whole batch. The connected-component stage (largest 8-connected component + hole
// filling) runs on the host: the binary masks (B*H*W bytes, 3 MB for 48 crops of 256x256) are
// copied to the CPU, labelled there by the same run-based union-find as the CPU backend (parallel
// over the batch) and copied back. That copy synchronises the stream; it is documented in
// maskattn.masks.content_based. Results are identical to the CPU backend's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
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
void morph(at::Tensor& bin, at::Tensor& tmp, int64_t H, int64_t W, int r, cudaStream_t stream) {
  if (r <= 0) return;
  const int64_t total = bin.numel();
  morph_pass_kernel<kMax, true><<<grid_for(total), kThreads, 0, stream>>>(
      bin.const_data_ptr<uint8_t>(), tmp.data_ptr<uint8_t>(), H, W, r, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  morph_pass_kernel<kMax, false><<<grid_for(total), kThreads, 0, stream>>>(
      tmp.const_data_ptr<uint8_t>(), bin.data_ptr<uint8_t>(), H, W, r, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> foreground_mask_cuda(const at::Tensor& images, double threshold,
                                                        int64_t open_radius, int64_t close_radius,
                                                        bool fill_holes, double sigma) {
  const ForegroundParams prm{threshold, open_radius, close_radius, fill_holes, sigma};
  const at::Tensor im = check_foreground_inputs(images, prm);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = im.size(0), C = im.size(1), H = im.size(2), W = im.size(3);
  auto fopts = im.options().dtype(at::kFloat);
  at::Tensor mask = at::empty({B, H, W}, fopts);
  at::Tensor coverage = at::empty({B}, fopts);
  if (B == 0) return {mask, coverage};
  if (H == 0 || W == 0) {
    coverage.zero_();
    return {mask, coverage};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = B * H * W;
  at::Tensor bin = at::empty({B, H, W}, im.options().dtype(at::kByte));
  at::Tensor tmp = at::empty_like(bin);
  Channels cw{};
  if (C == 3 || C == 4) grey_weights(C, cw.w);
  const double cut = foreground_cut(threshold, im.scalar_type() == at::kByte ? 255.0 : 1.0);

  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kByte, at::kHalf, at::kBFloat16, im.scalar_type(), "foreground_mask_cuda", [&] {
        threshold_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
            im.const_data_ptr<scalar_t>(), im.stride(0), im.stride(1), im.stride(2), im.stride(3), C, H, W,
            cw, cut, total, bin.data_ptr<uint8_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  morph<false>(bin, tmp, H, W, static_cast<int>(open_radius), stream);  // opening
  morph<true>(bin, tmp, H, W, static_cast<int>(open_radius), stream);
  morph<true>(bin, tmp, H, W, static_cast<int>(close_radius), stream);  // closing
  morph<false>(bin, tmp, H, W, static_cast<int>(close_radius), stream);

  // Connected components on the host (see the file comment): D2H, label, H2D.
  at::Tensor host = bin.to(at::kCPU);
  at::Tensor host_cov = at::empty({B}, host.options().dtype(at::kFloat));
  largest_component_cpu(host.data_ptr<uint8_t>(), B, H, W, fill_holes, host_cov.data_ptr<float>());
  bin.copy_(host);
  coverage.copy_(host_cov);

  const std::vector<float> gw = gaussian_weights(sigma);
  Taps t{};
  t.r = static_cast<int>(gw.size() / 2);
  TORCH_CHECK(static_cast<int>(gw.size()) <= kMaxTaps, "foreground_mask: sigma ", sigma,
              " needs too many taps");
  std::copy(gw.begin(), gw.end(), t.w);
  if (t.r == 0) {
    to_float_kernel<<<grid_for(total), kThreads, 0, stream>>>(bin.const_data_ptr<uint8_t>(),
                                                              mask.data_ptr<float>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {mask, coverage};
  }
  at::Tensor ftmp = at::empty({B, H, W}, fopts);
  gauss_pass_kernel<uint8_t, true><<<grid_for(total), kThreads, 0, stream>>>(
      bin.const_data_ptr<uint8_t>(), ftmp.data_ptr<float>(), H, W, t, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gauss_pass_kernel<float, false><<<grid_for(total), kThreads, 0, stream>>>(
      ftmp.const_data_ptr<float>(), mask.data_ptr<float>(), H, W, t, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, coverage};
}

}  // namespace
}  // namespace maskattn

TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("foreground_mask", &maskattn::foreground_mask_cuda);
}
