// CPU kernels of gated_masked_mean and its backward.
//
// The features tensor is the only large operand. The forward reads it once (no gate * features
// product is ever stored); the backward reads it once (for the gate gradient) and writes the
// feature gradient once, an outer product of two small tensors. Both channels-first (pixels
// contiguous) and channels-last (channels contiguous) features are read in place.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/parallel.h"
#include "common/stable.h"
#include "gated_masked_mean.h"

namespace maskattn {
namespace {

// Dot products as 16 independent partial sums combined in a fixed order: without -ffast-math a
// single running sum is a serial dependency chain the compiler may not vectorise, and the
// channels-first forward is nothing but these dots (one per (b, c) plane). float32 gets an FMA
// clone (AVX + FMA, picked at load time); other types use the same structure at baseline ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__NVCC__)
#define MASKATTN_CLONES_F32 __attribute__((target_clones("fma", "default")))
#else
#define MASKATTN_CLONES_F32
#endif

constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t tree16(const acc_t* s) {
  return (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) +
         (((s[8] + s[9]) + (s[10] + s[11])) + ((s[12] + s[13]) + (s[14] + s[15])));
}

// sum_p w[p] * x[p] as 16 lanes over blocks of 16 * kSumBlock pixels, the blocks added pairwise
// (common/cascade_sum.h): a 512x512 map is 2^18 pixels, 2^14 terms per lane. MASKED: only the
// pixels with w[p] != 0 - zero-weight pixels (padding, zero gates) are never multiplied, so
// inf/NaN stored there cannot reach the result.
template <bool MASKED, typename scalar_t, typename acc_t>
inline acc_t dot_blocked(const acc_t* __restrict__ w, const scalar_t* __restrict__ x, int64_t n) {
  constexpr int64_t kBlock = kLanes * cpu::kSumBlock;
  cpu::Cascade<acc_t> sum;
  int64_t p = 0;
  do {
    const int64_t end = std::min(n, p + kBlock);
    acc_t s[kLanes] = {};
    for (; p + kLanes <= end; p += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t wj = w[p + j];
        const acc_t t = wj * static_cast<acc_t>(x[p + j]);
        s[j] += MASKED ? (wj != acc_t(0) ? t : acc_t(0)) : t;
      }
    }
    for (int j = 0; p < end; ++p, ++j) {
      const acc_t t = w[p] * static_cast<acc_t>(x[p]);
      s[j] += MASKED ? (w[p] != acc_t(0) ? t : acc_t(0)) : t;
    }
    sum.add(tree16(s));
  } while (p < n);
  return sum.total();
}

template <typename scalar_t, typename acc_t>
inline acc_t masked_dot_t(const acc_t* __restrict__ w, const scalar_t* __restrict__ x, int64_t n) {
  return dot_blocked<true>(w, x, n);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot_t(const acc_t* __restrict__ a, const scalar_t* __restrict__ x, int64_t n) {
  return dot_blocked<false>(a, x, n);
}

MASKATTN_CLONES_F32 float masked_dot_f32(const float* __restrict__ w, const float* __restrict__ x,
                                         int64_t n) {
  return masked_dot_t<float, float>(w, x, n);
}
MASKATTN_CLONES_F32 float dot_f32(const float* __restrict__ a, const float* __restrict__ x, int64_t n) {
  return dot_t<float, float>(a, x, n);
}

// out[p] = a * g[p] and acc[p] += a * x[p]: the backward's row operations. A zero gate (padding,
// a gate that underflowed) gives exactly 0, selected rather than multiplied: a = grad_pooled /
// #valid may be inf or NaN, and 0 * inf would reach the padding's gradient.
template <typename scalar_t, typename acc_t>
inline void scale_row_t(scalar_t* __restrict__ out, const scalar_t* __restrict__ g, acc_t a, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    const acc_t gp = static_cast<acc_t>(g[p]);
    out[p] = static_cast<scalar_t>(gp != acc_t(0) ? a * gp : acc_t(0));
  }
}
template <typename scalar_t, typename acc_t>
inline void axpy_row_t(acc_t* __restrict__ acc, const scalar_t* __restrict__ x, acc_t a, int64_t n) {
  for (int64_t p = 0; p < n; ++p) acc[p] += a * static_cast<acc_t>(x[p]);
}
MASKATTN_CLONES_F32 void scale_row_f32(float* __restrict__ out, const float* __restrict__ g, float a,
                                       int64_t n) {
  scale_row_t<float, float>(out, g, a, n);
}
MASKATTN_CLONES_F32 void axpy_row_f32(float* __restrict__ acc, const float* __restrict__ x, float a,
                                      int64_t n) {
  axpy_row_t<float, float>(acc, x, a, n);
}
template <typename scalar_t, typename acc_t>
inline void scale_row(scalar_t* out, const scalar_t* g, acc_t a, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    scale_row_f32(out, g, a, n);
  } else {
    scale_row_t<scalar_t, acc_t>(out, g, a, n);
  }
}
template <typename scalar_t, typename acc_t>
inline void axpy_row(acc_t* acc, const scalar_t* x, acc_t a, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    axpy_row_f32(acc, x, a, n);
  } else {
    axpy_row_t<scalar_t, acc_t>(acc, x, a, n);
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t masked_dot(const acc_t* w, const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return masked_dot_f32(w, x, n);
  } else {
    return masked_dot_t<scalar_t, acc_t>(w, x, n);
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* a, const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dot_f32(a, x, n);
  } else {
    return dot_t<scalar_t, acc_t>(a, x, n);
  }
}

// How the kernels walk the features: pixel stride ps within a channel plane, channel stride cs.
struct FeatLayout {
  st::Tensor f;
  bool planar;  // ps == 1: each (b, c) plane is a contiguous row of H*W
  int64_t ps, cs, bs;
};

FeatLayout feature_layout(const st::Tensor& features) {
  const int64_t C = features.size(1), HW = features.size(2) * features.size(3);
  int64_t ps = HW <= 1 ? 1 : pixel_stride(st::View::of(features));
  const bool chlast = ps > 0 && (C <= 1 || features.stride(1) == 1);
  FeatLayout L;
  if (ps == 1 || chlast) {
    L.f = features;
  } else {
    L.f = torch::stable::contiguous(features);  // a rare layout: one copy, then the planar kernels
    ps = 1;
  }
  L.planar = ps == 1;
  L.ps = ps;
  L.cs = C <= 1 ? 1 : L.f.stride(1);
  L.bs = L.f.stride(0);
  return L;
}

// 1 / #valid pixels per sample (0 when none is valid), in the accumulation type.
template <typename acc_t>
std::vector<acc_t> inverse_counts(const st::Tensor& mask, int64_t B, int64_t H, int64_t W) {
  std::vector<acc_t> inv(B, acc_t(0));
  if (!mask.defined()) {
    std::fill(inv.begin(), inv.end(), H * W > 0 ? acc_t(1) / static_cast<acc_t>(H * W) : acc_t(0));
    return inv;
  }
  const bool* m = mask.const_data_ptr<bool>();
  const int64_t s0 = mask.stride(0), s1 = mask.stride(1), s2 = mask.stride(2);
  torch::stable::parallel_for(0, B, grain_for(H * W), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n = 0;
      for (int64_t y = 0; y < H; ++y) {
        const bool* row = m + b * s0 + y * s1;
        for (int64_t x = 0; x < W; ++x) n += row[x * s2];
      }
      inv[b] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
    }
  });
  return inv;
}

// Chunks of channels per sample so that a small batch still keeps every thread busy.
int64_t channel_chunks(int64_t B, int64_t C) {
  const int64_t nt = std::max<int64_t>(1, static_cast<int64_t>(torch::stable::get_num_threads()));
  const int64_t want = (2 * nt + std::max<int64_t>(B, 1) - 1) / std::max<int64_t>(B, 1);
  return std::max<int64_t>(1, std::min<int64_t>(want, (C + 15) / 16));
}

std::tuple<st::Tensor, st::Tensor> gated_masked_mean_cpu(const st::Tensor& features,
                                                         const st::Tensor& gate_logits,
                                                         const std::optional<st::Tensor>& mask) {
  GatedInputs in = check_gated_inputs(features, gate_logits, mask, "gated_masked_mean");
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t HW = H * W;
  // [B, 1, H, W] when the logits are: allocated so, not a view (an op output that is a view cannot be
  // modified in place under autograd); the kernels index it as [B, H*W] either way.
  const st::Device dev = features.device();
  st::Tensor gate = gate_logits.dim() == 4 ? st::empty({B, 1, H, W}, gate_logits.scalar_type(), dev)
                                           : st::empty({B, H, W}, gate_logits.scalar_type(), dev);
  st::Tensor pooled = st::empty({B, C}, features.scalar_type(), dev);
  const FeatLayout L = feature_layout(features);

  // A generic lambda outside the dispatch macro: commas in its body would split the macro's arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const std::vector<acc_t> inv = inverse_counts<acc_t>(in.mask, B, H, W);
    // w[b,p] = gate / #valid: the pooling weights, so the features pass is a plain weighted sum.
    std::vector<acc_t> wbuf(B * HW);
    acc_t* w = wbuf.data();
    const scalar_t* lg = in.logits.const_data_ptr<scalar_t>();
    const int64_t l0 = in.lv.stride[0], l1 = in.lv.stride[1], l2 = in.lv.stride[2];
    const bool* mp = in.mask.defined() ? in.mask.const_data_ptr<bool>() : nullptr;
    const int64_t m0 = mp ? in.mask.stride(0) : 0, m1 = mp ? in.mask.stride(1) : 0,
                  m2 = mp ? in.mask.stride(2) : 0;
    scalar_t* gp = gate.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(HW), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t y = 0; y < H; ++y) {
          for (int64_t x = 0; x < W; ++x) {
            const int64_t p = b * HW + y * W + x;
            const bool valid = mp == nullptr || mp[b * m0 + y * m1 + x * m2];
            const acc_t s =
                acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(lg[b * l0 + y * l1 + x * l2])));
            const scalar_t g = valid ? static_cast<scalar_t>(s) : scalar_t(0);
            gp[p] = g;
            // Weights from the rounded gate, so that half-precision outputs and weights agree.
            w[p] = static_cast<acc_t>(g) * inv[b];
          }
        }
      }
    });
    const scalar_t* f = L.f.const_data_ptr<scalar_t>();
    scalar_t* out = pooled.mutable_data_ptr<scalar_t>();
    if (L.planar) {
      torch::stable::parallel_for(0, B * C, grain_for(HW), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / C, c = i % C;
          const scalar_t* __restrict__ row = f + b * L.bs + c * L.cs;
          const acc_t* __restrict__ wb = w + b * HW;
          // The plain dot vectorises, the select does not (3x slower at 7x7): take the select
          // only for the rare plane whose plain dot is not finite, which may be a zero-weight
          // pixel holding inf/NaN (0 * inf). Zero-weight pixels (padding, and valid pixels whose
          // gate is 0) never reach the result, as on CUDA (docs/numerics.md, the zero-gate rule).
          acc_t v = dot<scalar_t, acc_t>(wb, row, HW);
          if (!std::isfinite(v)) v = masked_dot<scalar_t, acc_t>(wb, row, HW);
          out[i] = static_cast<scalar_t>(v);
        }
      });
    } else {
      // Pixels summed kSumBlock at a time, the blocks added pairwise (common/cascade_sum.h).
      const int64_t nch = channel_chunks(B, C), csz = (C + nch - 1) / nch;
      torch::stable::parallel_for(0, B * nch, grain_for(csz * HW), [&](int64_t t0, int64_t t1) {
        std::vector<acc_t> total(csz);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nch, c0 = (t % nch) * csz, c1 = std::min(C, c0 + csz);
          if (c0 >= c1) continue;
          cpu::ArrayCascade<acc_t> cascade(c1 - c0);
          for (int64_t p0 = 0; p0 < HW; p0 += cpu::kSumBlock) {
            acc_t* __restrict__ a = cascade.block();
            for (int64_t p = p0; p < std::min(HW, p0 + cpu::kSumBlock); ++p) {
              const acc_t wp = w[b * HW + p];
              if (wp == acc_t(0)) continue;
              const scalar_t* __restrict__ row = f + b * L.bs + p * L.ps + c0;
              for (int64_t c = 0; c < c1 - c0; ++c) a[c] += wp * static_cast<acc_t>(row[c]);
            }
            cascade.add_block(a);
          }
          cascade.total(total.data());
          for (int64_t c = c0; c < c1; ++c) out[b * C + c] = static_cast<scalar_t>(total[c - c0]);
        }
      });
    }
  };
  THO_DISPATCH_V2(features.scalar_type(), "gated_masked_mean_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return {pooled, gate};
}

std::tuple<st::Tensor, st::Tensor> gated_masked_mean_backward_cpu(
    const st::Tensor& grad_pooled, const std::optional<st::Tensor>& grad_gate, const st::Tensor& features,
    const st::Tensor& gate, const std::optional<st::Tensor>& mask, std::vector<bool> output_mask) {
  const GatedBackward g = prepare_gated_backward(grad_pooled, grad_gate, features, gate, mask, output_mask);
  const int64_t B = g.B, C = g.C, H = g.H, W = g.W, HW = g.HW;
  const bool need_f = g.need_f, need_l = g.need_l;
  st::Tensor grad_features = g.grad_features, grad_logits = g.grad_logits;
  if (!need_f && !need_l) return {grad_features, grad_logits};
  const st::Tensor &bmask = g.mask, &gpd = g.grad_pooled, &ggd = g.grad_gate, &gate_c = g.gate;

  // A generic lambda outside the dispatch macro: commas in its body would split the macro's arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const std::vector<acc_t> inv = inverse_counts<acc_t>(bmask, B, H, W);
    const acc_t* gpp = gpd.const_data_ptr<acc_t>();
    const scalar_t* gt = gate_c.const_data_ptr<scalar_t>();
    // d pooled[b,c] / d f[b,c,p] = gate[b,p] / #valid(b): an outer product, one write pass. For
    // channels-first features it is fused into the gate-gradient pass below (same (b, c) rows).
    const FeatLayout L = need_l ? feature_layout(features) : FeatLayout{};
    scalar_t* gf = need_f ? grad_features.mutable_data_ptr<scalar_t>() : nullptr;
    const bool fuse = need_f && need_l && L.planar;
    if (need_f && !fuse) {
      torch::stable::parallel_for(0, B * C, grain_for(HW), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / C;
          scale_row<scalar_t, acc_t>(gf + i * HW, gt + b * HW, gpp[i] * inv[b], HW);
        }
      });
    }
    if (!need_l || B * HW == 0) return;
    // dots[b,p] = sum_c grad_pooled[b,c] * f[b,c,p]
    const scalar_t* f = L.f.const_data_ptr<scalar_t>();
    std::vector<acc_t> dots(B * HW, acc_t(0));
    if (L.planar) {
      const int64_t nch = channel_chunks(B, C), csz = (C + nch - 1) / nch;
      std::vector<acc_t> part(B * nch * HW, acc_t(0));
      torch::stable::parallel_for(0, B * nch, grain_for(csz * HW), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nch, c0 = (t % nch) * csz, c1 = std::min(C, c0 + csz);
          acc_t* __restrict__ a = part.data() + t * HW;
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t gc = gpp[b * C + c];
            if (fuse) scale_row<scalar_t, acc_t>(gf + (b * C + c) * HW, gt + b * HW, gc * inv[b], HW);
            axpy_row<scalar_t, acc_t>(a, f + b * L.bs + c * L.cs, gc, HW);
          }
        }
      });
      // Fixed-order reduction of the chunks: the result does not depend on the thread schedule.
      torch::stable::parallel_for(0, B, grain_for(nch * HW), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          acc_t* __restrict__ d = dots.data() + b * HW;
          for (int64_t k = 0; k < nch; ++k) {
            const acc_t* __restrict__ a = part.data() + (b * nch + k) * HW;
            for (int64_t p = 0; p < HW; ++p) d[p] += a[p];
          }
        }
      });
    } else {
      torch::stable::parallel_for(0, B * HW, grain_for(C), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / HW, p = i % HW;
          const scalar_t* __restrict__ row = f + b * L.bs + p * L.ps;
          const acc_t* __restrict__ gb = gpp + b * C;
          dots[i] = dot<scalar_t, acc_t>(gb, row, C);
        }
      });
    }
    // d/d logit = s (1 - s) * (dots / #valid + grad_gate); padding (gate 0) gets exactly 0.
    const acc_t* gg = ggd.defined() ? ggd.const_data_ptr<acc_t>() : nullptr;
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(HW), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i = b * HW + p;
          const acc_t s = static_cast<acc_t>(gt[i]);
          const acc_t up = dots[i] * inv[b] + (gg ? gg[i] : acc_t(0));
          gl[i] = s != acc_t(0) ? static_cast<scalar_t>(s * (acc_t(1) - s) * up) : scalar_t(0);
        }
      }
    });
  };
  THO_DISPATCH_V2(features.scalar_type(), "gated_masked_mean_backward_cpu",
                  AT_WRAP([&] { body(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return {grad_features, grad_logits};
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("gated_masked_mean", TORCH_BOX(&maskattn::gated_masked_mean_cpu));
  m.impl("_gated_masked_mean_backward", TORCH_BOX(&maskattn::gated_masked_mean_backward_cpu));
}
