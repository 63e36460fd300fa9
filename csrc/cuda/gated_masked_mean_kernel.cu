// CUDA kernels of gated_masked_mean and its backward.
//
// Forward: one small kernel turns gate logits + mask into per-pixel pooling weights (gate/#valid)
// and the gate output; one pass over the features then pools (a warp per (b, c) plane for
// channels-first features, a thread per (b, c) walking the pixels for channels-last, so reads are
// coalesced either way). Backward: the feature gradient is an outer product written in one pass;
// the gate gradient reduces grad_pooled . features over channels per pixel.
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "gated_masked_mean.h"

namespace maskattn {
namespace {

constexpr int kThreads = 256;

using cuda::warp_sum;

// Block-wide count of valid pixels of sample b; every thread gets the result.
__device__ __forceinline__ int64_t block_count_valid(const bool* mask, int64_t b, int64_t H, int64_t W,
                                                     int64_t m0, int64_t m1, int64_t m2) {
  __shared__ int64_t part[kThreads / 32];
  int64_t n = 0;
  if (mask == nullptr) {
    n = threadIdx.x == 0 ? H * W : 0;
  } else {
    for (int64_t p = threadIdx.x; p < H * W; p += blockDim.x) n += mask[b * m0 + (p / W) * m1 + (p % W) * m2];
  }
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = n;
  __syncthreads();
  int64_t total = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += part[i];
  __syncthreads();
  return total;
}

// One block per sample: gate = valid * sigmoid(logit) (output) and w = gate / #valid (fp32/fp64).
template <typename scalar_t, typename acc_t>
__global__ void gate_weights_kernel(const scalar_t* __restrict__ logits, int64_t l0, int64_t l1, int64_t l2,
                                    const bool* __restrict__ mask, int64_t m0, int64_t m1, int64_t m2,
                                    int64_t H, int64_t W, scalar_t* __restrict__ gate,
                                    acc_t* __restrict__ w) {
  const int64_t b = blockIdx.x, HW = H * W;
  const int64_t n = block_count_valid(mask, b, H, W, m0, m1, m2);
  const acc_t inv = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const int64_t y = p / W, x = p % W;
    const bool valid = mask == nullptr || mask[b * m0 + y * m1 + x * m2];
    const acc_t s = acc_t(1) / (acc_t(1) + ::exp(-static_cast<acc_t>(logits[b * l0 + y * l1 + x * l2])));
    const scalar_t g = valid ? static_cast<scalar_t>(s) : scalar_t(0);
    gate[b * HW + p] = g;
    w[b * HW + p] = static_cast<acc_t>(g) * inv;
  }
}

// Channels-first: a warp per (b, c) plane of HW contiguous pixels.
template <typename scalar_t, typename acc_t>
__global__ void pool_planar_kernel(const scalar_t* __restrict__ f, int64_t bs, int64_t cs,
                                   const acc_t* __restrict__ w, int64_t B, int64_t C, int64_t HW,
                                   scalar_t* __restrict__ out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= B * C) return;
  const int64_t b = warp / C, c = warp % C;
  const scalar_t* row = f + b * bs + c * cs;
  const acc_t* wb = w + b * HW;
  // A lane's share of a large map (2^13 pixels of a 512x512 plane) is summed kFold at a time.
  acc_t s = 0, s_out = 0;
  int fold = 0;
  for (int64_t p = lane; p < HW; p += 32) {
    const acc_t wp = wb[p];
    // zero-weight pixels (padding, zero gates) are never read (docs/numerics.md, the zero-gate rule)
    if (wp != acc_t(0)) s += wp * static_cast<acc_t>(row[p]);
    if (++fold == cuda::kFold) {
      fold = 0;
      s_out += s;
      s = 0;
    }
  }
  s = warp_sum(s + s_out);
  if (lane == 0) out[warp] = static_cast<scalar_t>(s);
}

// Channels-last (or any pixel stride): a thread per (b, c), consecutive threads on consecutive c.
template <typename scalar_t, typename acc_t>
__global__ void pool_strided_kernel(const scalar_t* __restrict__ f, int64_t bs, int64_t cs, int64_t ps,
                                    const acc_t* __restrict__ w, int64_t C, int64_t HW, int64_t cblocks,
                                    scalar_t* __restrict__ out) {
  // The batch is folded into grid.x: grid.y is limited to 65535.
  const int64_t b = blockIdx.x / cblocks;
  const int64_t c = (blockIdx.x % cblocks) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const scalar_t* base = f + b * bs + c * cs;
  const acc_t* wb = w + b * HW;
  // A thread walks all H * W pixels: three levels of kFold (cuda_utils.cuh), so the error grows
  // with 2 * kFold + H * W / kFold^2 rather than with H * W.
  acc_t s = 0, s_mid = 0, s_out = 0;
  int fold = 0, fold_mid = 0;
  for (int64_t p = 0; p < HW; ++p) {
    const acc_t wp = wb[p];
    if (wp != acc_t(0)) s += wp * static_cast<acc_t>(base[p * ps]);
    if (++fold == cuda::kFold) {
      fold = 0;
      s_mid += s;
      s = 0;
      if (++fold_mid == cuda::kFold) {
        fold_mid = 0;
        s_out += s_mid;
        s_mid = 0;
      }
    }
  }
  out[b * C + c] = static_cast<scalar_t>(s + (s_mid + s_out));
}

template <typename acc_t>
__global__ void inverse_counts_kernel(const bool* __restrict__ mask, int64_t m0, int64_t m1, int64_t m2,
                                      int64_t H, int64_t W, acc_t* __restrict__ inv) {
  const int64_t b = blockIdx.x;
  const int64_t n = block_count_valid(mask, b, H, W, m0, m1, m2);
  if (threadIdx.x == 0) inv[b] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
}

// grad_features[b,c,p] = grad_pooled[b,c] * gate[b,p] / #valid(b), contiguous output.
template <typename scalar_t, typename acc_t>
__global__ void grad_features_kernel(const acc_t* __restrict__ gp, const scalar_t* __restrict__ gate,
                                     const acc_t* __restrict__ inv, int64_t C, int64_t HW, int64_t total,
                                     scalar_t* __restrict__ gf) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i % HW, bc = i / HW, b = bc / C;
    // a zero gate (padding, an underflowed gate) gives exactly 0, selected rather than multiplied:
    // grad_pooled may be inf or NaN
    const acc_t gt = static_cast<acc_t>(gate[b * HW + p]);
    gf[i] = static_cast<scalar_t>(gt != acc_t(0) ? gp[bc] * inv[b] * gt : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t gate_grad(acc_t s, acc_t dot, acc_t inv, acc_t gg) {
  // padding (gate exactly 0) gets exactly 0, whatever the features hold there
  return s != acc_t(0) ? static_cast<scalar_t>(s * (acc_t(1) - s) * (dot * inv + gg)) : scalar_t(0);
}

// Channels-first gate gradient: block = 32 pixels x 8 channel groups, reduced in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void grad_logits_planar_kernel(const scalar_t* __restrict__ f, int64_t bs, int64_t cs,
                                          const acc_t* __restrict__ gp, const scalar_t* __restrict__ gate,
                                          const acc_t* __restrict__ gg, const acc_t* __restrict__ inv,
                                          int64_t C, int64_t HW, int64_t pblocks, scalar_t* __restrict__ gl) {
  __shared__ acc_t part[8][32];
  const int64_t b = blockIdx.x / pblocks;
  const int px = threadIdx.x & 31, cg = threadIdx.x >> 5;
  const int64_t p = (blockIdx.x % pblocks) * 32 + px;
  acc_t s = 0;
  if (p < HW) {
    for (int64_t c = cg; c < C; c += 8) s += gp[b * C + c] * static_cast<acc_t>(f[b * bs + c * cs + p]);
  }
  part[cg][px] = s;
  __syncthreads();
  if (cg == 0 && p < HW) {
    acc_t dot = 0;
    for (int k = 0; k < 8; ++k) dot += part[k][px];
    const int64_t i = b * HW + p;
    gl[i] = gate_grad<scalar_t>(static_cast<acc_t>(gate[i]), dot, inv[b], gg ? gg[i] : acc_t(0));
  }
}

// Channels-last gate gradient: a warp per pixel, lanes over channels.
template <typename scalar_t, typename acc_t>
__global__ void grad_logits_strided_kernel(const scalar_t* __restrict__ f, int64_t bs, int64_t cs, int64_t ps,
                                           const acc_t* __restrict__ gp, const scalar_t* __restrict__ gate,
                                           const acc_t* __restrict__ gg, const acc_t* __restrict__ inv,
                                           int64_t B, int64_t C, int64_t HW, scalar_t* __restrict__ gl) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= B * HW) return;
  const int64_t b = warp / HW, p = warp % HW;
  const scalar_t* base = f + b * bs + p * ps;
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += 32) s += gp[b * C + c] * static_cast<acc_t>(base[c * cs]);
  s = warp_sum(s);
  if (lane == 0)
    gl[warp] = gate_grad<scalar_t>(static_cast<acc_t>(gate[warp]), s, inv[b], gg ? gg[warp] : acc_t(0));
}

struct Layout {
  st::Tensor f;
  bool planar;
  int64_t bs, cs, ps;
};

Layout layout_of(const st::Tensor& features) {
  const int64_t C = features.size(1), HW = features.size(2) * features.size(3);
  int64_t ps = HW <= 1 ? 1 : pixel_stride(st::View::of(features));
  Layout L;
  L.f = ps > 0 ? features : torch::stable::contiguous(features);
  if (ps <= 0) ps = 1;
  L.planar = ps == 1;
  L.ps = ps;
  L.cs = C <= 1 ? 1 : L.f.stride(1);
  L.bs = L.f.stride(0);
  return L;
}

int64_t blocks_for(int64_t n, int64_t per_block) {
  return std::max<int64_t>(1, (n + per_block - 1) / per_block);
}

// These kernels map each block to a fixed slice (no grid-stride loop), so a grid past gridDim.x's
// limit of 2^31 - 1 must be refused: passing the int64 count straight to <<<>>> would truncate it.
unsigned grid_x(int64_t blocks, const char* what) {
  MASKATTN_CHECK(blocks <= INT32_MAX, "gated_masked_mean: ", what, " = ", blocks,
                 " CUDA blocks exceeds the grid limit 2^31 - 1");
  return static_cast<unsigned>(blocks);
}

std::tuple<st::Tensor, st::Tensor> gated_masked_mean_cuda(const st::Tensor& features,
                                                          const st::Tensor& gate_logits,
                                                          const std::optional<st::Tensor>& mask) {
  GatedInputs in = check_gated_inputs(features, gate_logits, mask, "gated_masked_mean");
  const int32_t dev_index = features.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t HW = H * W;
  const st::Device dev = features.device();
  // [B, 1, H, W] when the logits are: allocated so, not a view (an op output that is a view cannot be
  // modified in place under autograd); the kernels index it as [B, H*W] either way.
  st::Tensor gate = gate_logits.dim() == 4 ? st::empty({B, 1, H, W}, gate_logits.scalar_type(), dev)
                                           : st::empty({B, H, W}, gate_logits.scalar_type(), dev);
  st::Tensor pooled = st::empty({B, C}, features.scalar_type(), dev);
  auto ret = [&] { return std::make_tuple(pooled, gate); };
  if (B == 0) return ret();
  if (HW == 0) {
    torch::stable::zero_(pooled);
    return ret();
  }
  const Layout L = layout_of(features);
  const cudaStream_t stream = st::current_stream(dev_index);
  const st::ScalarType acc_type = st::acc_dtype(features.scalar_type());
  st::Tensor w = st::empty({B, HW}, acc_type, dev);
  const bool* mp = in.mask.defined() ? in.mask.const_data_ptr<bool>() : nullptr;
  const int64_t m0 = mp ? in.mask.stride(0) : 0, m1 = mp ? in.mask.stride(1) : 0,
                m2 = mp ? in.mask.stride(2) : 0;

  // A generic lambda outside the dispatch macro: the commas of <<<...>>> would split its arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    gate_weights_kernel<scalar_t, acc_t><<<grid_x(B, "B"), kThreads, 0, stream>>>(
        in.logits.const_data_ptr<scalar_t>(), in.lv.stride[0], in.lv.stride[1], in.lv.stride[2], mp, m0, m1,
        m2, H, W, gate.mutable_data_ptr<scalar_t>(), w.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
    if (C == 0) return;
    if (L.planar) {
      pool_planar_kernel<scalar_t, acc_t>
          <<<grid_x(blocks_for(B * C, kThreads / 32), "B * C / 8"), kThreads, 0, stream>>>(
              L.f.const_data_ptr<scalar_t>(), L.bs, L.cs, w.const_data_ptr<acc_t>(), B, C, HW,
              pooled.mutable_data_ptr<scalar_t>());
    } else {
      const int64_t cblocks = blocks_for(C, kThreads);
      pool_strided_kernel<scalar_t, acc_t><<<grid_x(B * cblocks, "B * ceil(C / 256)"), kThreads, 0, stream>>>(
          L.f.const_data_ptr<scalar_t>(), L.bs, L.cs, L.ps, w.const_data_ptr<acc_t>(), C, HW, cblocks,
          pooled.mutable_data_ptr<scalar_t>());
    }
    MASKATTN_CUDA_LAUNCH_CHECK();
  };
  THO_DISPATCH_V2(features.scalar_type(), "gated_masked_mean_cuda", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return ret();
}

std::tuple<st::Tensor, st::Tensor> gated_masked_mean_backward_cuda(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_gate, const st::Tensor& features,
    const st::Tensor& gate, const std::optional<st::Tensor>& mask, std::vector<bool> output_mask) {
  const int32_t dev_index = features.get_device_index();
  const st::DeviceGuard guard(dev_index);
  const GatedBackward g = prepare_gated_backward(grad_pooled, grad_gate, features, gate, mask, output_mask);
  const int64_t B = g.B, C = g.C, H = g.H, W = g.W, HW = g.HW;
  const bool need_f = g.need_f, need_l = g.need_l;
  st::Tensor grad_features = g.grad_features, grad_logits = g.grad_logits;
  auto ret = [&] { return std::make_tuple(grad_features, grad_logits); };
  if ((!need_f && !need_l) || B == 0 || HW == 0) return ret();
  const st::Tensor &bmask = g.mask, &gpd = g.grad_pooled, &ggd = g.grad_gate, &gate_c = g.gate;
  const st::Device dev = features.device();
  const st::ScalarType acc_type = st::acc_dtype(features.scalar_type());
  st::Tensor inv = st::empty({B}, acc_type, dev);
  const cudaStream_t stream = st::current_stream(dev_index);
  const bool* mp = bmask.defined() ? bmask.const_data_ptr<bool>() : nullptr;
  const int64_t m0 = mp ? bmask.stride(0) : 0, m1 = mp ? bmask.stride(1) : 0, m2 = mp ? bmask.stride(2) : 0;

  // A generic lambda outside the dispatch macro: the commas of <<<...>>> would split its arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    inverse_counts_kernel<acc_t>
        <<<grid_x(B, "B"), kThreads, 0, stream>>>(mp, m0, m1, m2, H, W, inv.mutable_data_ptr<acc_t>());
    MASKATTN_CUDA_LAUNCH_CHECK();
    if (need_f && C > 0) {
      const int64_t total = B * C * HW;
      grad_features_kernel<scalar_t, acc_t>
          <<<std::min<int64_t>(blocks_for(total, kThreads), 1 << 20), kThreads, 0, stream>>>(
              gpd.const_data_ptr<acc_t>(), gate_c.const_data_ptr<scalar_t>(), inv.const_data_ptr<acc_t>(), C,
              HW, total, grad_features.mutable_data_ptr<scalar_t>());
      MASKATTN_CUDA_LAUNCH_CHECK();
    }
    if (!need_l) return;
    const Layout L = layout_of(features);
    const acc_t* ggp = ggd.defined() ? ggd.const_data_ptr<acc_t>() : nullptr;
    if (L.planar) {
      const int64_t pblocks = blocks_for(HW, 32);
      grad_logits_planar_kernel<scalar_t, acc_t>
          <<<grid_x(B * pblocks, "B * ceil(H * W / 32)"), kThreads, 0, stream>>>(
              L.f.const_data_ptr<scalar_t>(), L.bs, L.cs, gpd.const_data_ptr<acc_t>(),
              gate_c.const_data_ptr<scalar_t>(), ggp, inv.const_data_ptr<acc_t>(), C, HW, pblocks,
              grad_logits.mutable_data_ptr<scalar_t>());
    } else {
      grad_logits_strided_kernel<scalar_t, acc_t>
          <<<grid_x(blocks_for(B * HW, kThreads / 32), "B * H * W / 8"), kThreads, 0, stream>>>(
              L.f.const_data_ptr<scalar_t>(), L.bs, L.cs, L.ps, gpd.const_data_ptr<acc_t>(),
              gate_c.const_data_ptr<scalar_t>(), ggp, inv.const_data_ptr<acc_t>(), B, C, HW,
              grad_logits.mutable_data_ptr<scalar_t>());
    }
    MASKATTN_CUDA_LAUNCH_CHECK();
  };
  THO_DISPATCH_V2(features.scalar_type(), "gated_masked_mean_backward_cuda",
                  AT_WRAP([&] { body(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return ret();
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("gated_masked_mean", TORCH_BOX(&maskattn::gated_masked_mean_cuda));
  m.impl("_gated_masked_mean_backward", TORCH_BOX(&maskattn::gated_masked_mean_backward_cuda));
}
