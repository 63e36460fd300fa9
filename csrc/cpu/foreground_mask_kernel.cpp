// CPU kernels of foreground_mask: the content-based face mask of a thermal-face pipeline, one image per task.
//
// Stages, all on one image's HxW buffers (they stay in L2 for 224-256 px crops):
//   grey + threshold -> opening -> closing -> largest 8-connected component -> hole filling
//   -> coverage -> separable Gaussian (reflect-101 border, as cv2.GaussianBlur).
// Binary stages work on 0/1 bytes so the min/max of morphology are AND/OR over whole rows, which
// the compiler vectorises. Connected components are labelled on runs (row segments), not pixels:
// a face is a few hundred runs, so union-find touches a few hundred nodes instead of 65k pixels,
// and runs are found eight bytes at a time.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/stable.h"
#include "common/parallel.h"
#include "foreground_mask.h"

namespace maskattn {
namespace {

// Row primitives. The hot loops of this file are these few lines over whole rows; they are
// compiled for a wider ISA as well as the baseline one and picked at load time (GCC/Clang function
// multiversioning), since the wheel must run on any x86-64. Byte AND/OR only gets wider with AVX2;
// float loops get 8 lanes and FMA from the "fma" clone (which implies AVX), which also serves
// CPUs with AVX + FMA but no AVX2, such as this project's CI machines.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__NVCC__)
#define MASKATTN_CLONES __attribute__((target_clones("avx2", "default")))
#define MASKATTN_CLONES_F32 __attribute__((target_clones("fma", "default")))
#else
#define MASKATTN_CLONES
#define MASKATTN_CLONES_F32
#endif

MASKATTN_CLONES void or_into(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int n) {
  for (int x = 0; x < n; ++x) out[x] |= in[x];
}
MASKATTN_CLONES void and_into(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int n) {
  for (int x = 0; x < n; ++x) out[x] &= in[x];
}
MASKATTN_CLONES_F32 void axpy_into(float* __restrict__ out, const float* __restrict__ in, float w, int n) {
  for (int x = 0; x < n; ++x) out[x] += w * in[x];
}
MASKATTN_CLONES_F32 void scale_into(float* __restrict__ out, const float* __restrict__ in, float w, int n) {
  for (int x = 0; x < n; ++x) out[x] = w * in[x];
}
MASKATTN_CLONES_F32 void bytes_to_float(float* __restrict__ out, const uint8_t* __restrict__ in, int n) {
  for (int x = 0; x < n; ++x) out[x] = static_cast<float>(in[x]);
}

// First x' >= x with row[x'] != v (v is 0 or 1), or W. Eight pixels per step: uniform stretches
// (most of a mask) cost one compare per eight pixels.
inline int skip_equal(const uint8_t* row, int x, int W, uint8_t v) {
  const uint64_t pat = v ? 0x0101010101010101ULL : 0ULL;
  while (x + 8 <= W) {
    uint64_t w;
    std::memcpy(&w, row + x, 8);
    const uint64_t d = w ^ pat;
    if (d) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
      return x + (__builtin_clzll(d) >> 3);
#else
      return x + (__builtin_ctzll(d) >> 3);
#endif
    }
    x += 8;
  }
  while (x < W && row[x] == v) ++x;
  return x;
}

inline bool row_uniform(const uint8_t* row, int W) {
  return W == 0 || skip_equal(row, 0, W, row[0]) == W;
}

// Morphology with a (2r+1)x(2r+1) square on a 0/1 image. Pixels outside the image are ignored
// (the identity of the operation), as OpenCV's default border for erode/dilate does, so an
// object touching the image edge is not eaten by erosion.
template <bool kMax>
void morph_square(uint8_t* __restrict__ img, uint8_t* __restrict__ tmp, std::vector<uint8_t>& uniform, int H,
                  int W, int r) {
  if (r <= 0) return;
  // Horizontal pass into tmp: each shift is a full-row AND/OR. A uniform row is its own result.
  uniform.resize(H);
  for (int y = 0; y < H; ++y) {
    const uint8_t* in = img + static_cast<int64_t>(y) * W;
    uint8_t* out = tmp + static_cast<int64_t>(y) * W;
    std::memcpy(out, in, W);
    uniform[y] = row_uniform(in, W);
    if (uniform[y]) continue;
    for (int k = 1; k <= r && k < W; ++k) {
      if (kMax) {
        or_into(out, in + k, W - k);
        or_into(out + k, in, W - k);
      } else {
        and_into(out, in + k, W - k);
        and_into(out + k, in, W - k);
      }
    }
  }
  // Vertical pass back into img: row y combines tmp rows y-r..y+r clipped to the image; a window
  // of identical uniform rows is skipped.
  for (int y = 0; y < H; ++y) {
    uint8_t* out = img + static_cast<int64_t>(y) * W;
    const int y0 = std::max(0, y - r), y1 = std::min(H - 1, y + r);
    bool same = true;
    for (int yy = y0; yy <= y1 && same; ++yy)
      same = uniform[yy] && tmp[static_cast<int64_t>(yy) * W] == tmp[static_cast<int64_t>(y) * W];
    if (same) {
      std::memcpy(out, tmp + static_cast<int64_t>(y) * W, W);
      continue;
    }
    std::memcpy(out, tmp + static_cast<int64_t>(y0) * W, W);
    for (int yy = y0 + 1; yy <= y1; ++yy) {
      if (kMax) {
        or_into(out, tmp + static_cast<int64_t>(yy) * W, W);
      } else {
        and_into(out, tmp + static_cast<int64_t>(yy) * W, W);
      }
    }
  }
}

struct Run {
  int y, x0, x1;  // pixels [x0, x1) of row y
};

// Runs of value v and their components (union-find, 8- or 4-connectivity). Roots are always the
// smallest run index of their component, i.e. the component's first run in raster order, so the
// labelling - and every tie-break below - is deterministic.
class RunLabels {
 public:
  std::vector<Run> runs;
  std::vector<int> parent;

  void label(const uint8_t* img, int H, int W, uint8_t v, bool conn8) {
    runs.clear();
    parent.clear();
    const int d = conn8 ? 1 : 0;
    int prev_begin = 0, prev_end = 0;
    for (int y = 0; y < H; ++y) {
      const uint8_t* row = img + static_cast<int64_t>(y) * W;
      const int cur_begin = static_cast<int>(runs.size());
      int x = skip_equal(row, 0, W, static_cast<uint8_t>(1 - v));
      while (x < W) {
        const int x1 = skip_equal(row, x, W, v);
        runs.push_back({y, x, x1});
        parent.push_back(static_cast<int>(runs.size()) - 1);
        x = skip_equal(row, x1, W, static_cast<uint8_t>(1 - v));
      }
      const int cur_end = static_cast<int>(runs.size());
      // Merge with the previous row: both run lists are sorted by x, so two pointers suffice.
      int j = prev_begin;
      for (int c = cur_begin; c < cur_end; ++c) {
        const Run& rc = runs[c];
        while (j < prev_end && runs[j].x1 + d <= rc.x0) ++j;
        for (int k = j; k < prev_end && runs[k].x0 < rc.x1 + d; ++k) unite(c, k);
      }
      prev_begin = cur_begin;
      prev_end = cur_end;
    }
    for (size_t i = 0; i < parent.size(); ++i) parent[i] = parent[parent[i]];  // roots precede children
  }

 private:
  int find(int i) {
    while (parent[i] != i) {
      parent[i] = parent[parent[i]];
      i = parent[i];
    }
    return i;
  }
  void unite(int a, int b) {
    a = find(a);
    b = find(b);
    if (a < b) std::swap(a, b);
    parent[a] = b;
  }
};

// Largest component (+ hole filling) of one image, in place; returns the foreground pixel count.
int64_t largest_component_one(uint8_t* img, int H, int W, bool fill_holes, RunLabels& L,
                              std::vector<int64_t>& area) {
  L.label(img, H, W, 1, /*conn8=*/true);
  const int n = static_cast<int>(L.runs.size());
  std::memset(img, 0, static_cast<size_t>(H) * W);
  if (n == 0) return 0;
  area.assign(n, 0);
  for (int i = 0; i < n; ++i) area[L.parent[i]] += L.runs[i].x1 - L.runs[i].x0;
  int best = 0;
  for (int i = 1; i < n; ++i) {
    if (area[i] > area[best]) best = i;  // strict: ties keep the first component in raster order
  }
  int64_t count = area[best];
  for (int i = 0; i < n; ++i) {
    if (L.parent[i] == best)
      std::memset(img + static_cast<int64_t>(L.runs[i].y) * W + L.runs[i].x0, 1, L.runs[i].x1 - L.runs[i].x0);
  }
  if (!fill_holes) return count;
  // Holes: background regions (4-connected, the dual of 8-connected foreground) that do not
  // reach the image border.
  L.label(img, H, W, 0, /*conn8=*/false);
  const int m = static_cast<int>(L.runs.size());
  std::vector<uint8_t> outside(m, 0);
  for (int i = 0; i < m; ++i) {
    const Run& r = L.runs[i];
    if (r.y == 0 || r.y == H - 1 || r.x0 == 0 || r.x1 == W) outside[L.parent[i]] = 1;
  }
  for (int i = 0; i < m; ++i) {
    if (!outside[L.parent[i]]) {
      const Run& r = L.runs[i];
      std::memset(img + static_cast<int64_t>(r.y) * W + r.x0, 1, r.x1 - r.x0);
      count += r.x1 - r.x0;
    }
  }
  return count;
}

// Reflect-101 index tables (cv2's default border): ... 2 1 | 0 1 2 ... n-1 | n-2 ...
std::vector<int> reflect101_table(int n, int r) {
  std::vector<int> t(n + 2 * r);
  for (int i = -r; i < n + r; ++i) {
    int j = i;
    if (n == 1) {
      j = 0;
    } else {
      while (j < 0 || j >= n) j = j < 0 ? -j : 2 * (n - 1) - j;
    }
    t[i + r] = j;
  }
  return t;
}

// Separable Gaussian of a 0/1 image into a float image in [0, 1]. A binary row blurred along x
// differs from itself only within r pixels of a 0/1 transition, so the horizontal pass converts
// the row and recomputes those few pixels; the vertical pass is a full-row weighted sum, skipped
// where the whole window is one uniform value.
void gaussian_smooth(const uint8_t* __restrict__ img, float* __restrict__ out, float* __restrict__ tmp,
                     std::vector<uint8_t>& uniform, int H, int W, const std::vector<float>& w,
                     const std::vector<int>& tx, const std::vector<int>& ty) {
  const int r = static_cast<int>(w.size() / 2);
  if (r == 0) {
    for (int y = 0; y < H; ++y)
      bytes_to_float(out + static_cast<int64_t>(y) * W, img + static_cast<int64_t>(y) * W, W);
    return;
  }
  uniform.resize(H);
  for (int y = 0; y < H; ++y) {
    const uint8_t* in = img + static_cast<int64_t>(y) * W;
    float* t = tmp + static_cast<int64_t>(y) * W;
    bytes_to_float(t, in, W);
    int x = skip_equal(in, 0, W, in[0]);
    uniform[y] = x == W;
    while (x < W) {  // transition between x-1 and x
      const int lo = std::max(0, x - r), hi = std::min(W, x + r);
      for (int xx = lo; xx < hi; ++xx) {
        float s = 0.f;
        for (int k = 0; k <= 2 * r; ++k) s += w[k] * static_cast<float>(in[tx[xx + k]]);
        t[xx] = s;
      }
      x = skip_equal(in, x, W, in[x]);
    }
  }
  for (int y = 0; y < H; ++y) {
    float* o = out + static_cast<int64_t>(y) * W;
    bool same = true;
    for (int k = 0; k <= 2 * r && same; ++k) {
      const int yy = ty[y + k];
      same = uniform[yy] && img[static_cast<int64_t>(yy) * W] == img[static_cast<int64_t>(y) * W];
    }
    if (same) {
      std::fill(o, o + W, static_cast<float>(img[static_cast<int64_t>(y) * W]));
      continue;
    }
    scale_into(o, tmp + static_cast<int64_t>(ty[y]) * W, w[0], W);
    for (int k = 1; k <= 2 * r; ++k) axpy_into(o, tmp + static_cast<int64_t>(ty[y + k]) * W, w[k], W);
    // The weights sum to 1 only up to rounding; a mask must stay within [0, 1].
    for (int x = 0; x < W; ++x) o[x] = std::min(1.f, std::max(0.f, o[x]));
  }
}

// Binary foreground of one image: grey level >= cut (foreground_mask.h: float64, each product and
// sum rounded on its own, in channel order - the rule CUDA follows bit for bit). Reads any strides.
// GCC contracts a * b + c into an FMA wherever the target has one (the "fma" clones, aarch64),
// also across statements, so contraction is switched off for this function alone; Clang takes
// the standard pragma inside the body.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
template <typename scalar_t>
void threshold_image(const scalar_t* base, int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sh,
                     int64_t sw, const double* cw, double cut, uint8_t* out, double* acc) {
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
  const bool luma = C == 3 || C == 4;
  for (int64_t y = 0; y < H; ++y) {
    uint8_t* o = out + y * W;
    if (C == 1) {
      const scalar_t* p = base + y * sh;
      for (int64_t x = 0; x < W; ++x) o[x] = static_cast<double>(p[x * sw]) >= cut;
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      if (luma && cw[c] == 0.0) continue;  // alpha
      const scalar_t* p = base + c * sc + y * sh;
      const double wc = luma ? cw[c] : 1.0;
      if (c == 0) {
        for (int64_t x = 0; x < W; ++x)
          acc[x] = luma ? wc * static_cast<double>(p[x * sw]) : static_cast<double>(p[x * sw]);
      } else {
        for (int64_t x = 0; x < W; ++x) {
          const double t = luma ? wc * static_cast<double>(p[x * sw]) : static_cast<double>(p[x * sw]);
          acc[x] = acc[x] + t;
        }
      }
    }
    if (luma) {
      for (int64_t x = 0; x < W; ++x) o[x] = acc[x] >= cut;
    } else {
      const double n = static_cast<double>(C);
      for (int64_t x = 0; x < W; ++x) o[x] = acc[x] / n >= cut;
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

std::tuple<st::Tensor, st::Tensor> foreground_mask_cpu(const st::Tensor& images, double threshold,
                                                       int64_t open_radius, int64_t close_radius,
                                                       bool fill_holes, double sigma) {
  const ForegroundParams p{threshold, open_radius, close_radius, fill_holes, sigma};
  const st::View im = check_foreground_inputs(images, p);
  const int64_t B = im.size[0], C = im.size[1], H = im.size[2], W = im.size[3];
  // The per-image stages index rows, runs and labels with int (half the memory of int64 in the
  // union-find); an image of 2^31 pixels or more would overflow them, so refuse it up front.
  MASKATTN_CHECK(H * W <= INT32_MAX, "foreground_mask: images of ", H, "x", W,
                 " pixels are too large (at most 2^31 - 1 pixels per image)");
  const int64_t mask_sizes[3] = {B, H, W};
  st::Tensor mask = st::empty(mask_sizes, 3, st::ScalarType::Float, images.device());
  st::Tensor coverage = st::empty(&B, 1, st::ScalarType::Float, images.device());
  if (B == 0) return {mask, coverage};
  float* cp = coverage.mutable_data_ptr<float>();
  if (H == 0 || W == 0) {
    std::fill(cp, cp + B, 0.f);
    return {mask, coverage};
  }
  const bool is_u8 = images.scalar_type() == st::ScalarType::Byte;
  const double cut = foreground_cut(threshold, is_u8 ? 255.0 : 1.0);
  std::vector<double> cw(C);
  grey_weights(C, cw.data());
  const std::vector<float> gw = gaussian_weights(sigma);
  const int gr = static_cast<int>(gw.size() / 2);
  const std::vector<int> tx = reflect101_table(static_cast<int>(W), gr);
  const std::vector<int> ty = reflect101_table(static_cast<int>(H), gr);
  float* mp = mask.mutable_data_ptr<float>();
  const void* data = images.const_data_ptr();
  const int Hi = static_cast<int>(H), Wi = static_cast<int>(W);

  // A generic lambda outside the dispatch macro: commas in its body would split the macro's arguments.
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* ip = static_cast<const scalar_t*>(data);
    // One image per task: the stages are sequential within an image, independent across
    // images. Images are handed out one at a time from a shared counter rather than in fixed
    // halves, so a core that is busy with something else (a data loader shares the machine)
    // takes fewer images instead of holding back the whole batch. Each image's result does
    // not depend on which thread computes it, so the output stays deterministic.
    std::atomic<int64_t> next{0};
    // A batch of little work stays on the calling thread (common/parallel.h); each pixel goes
    // through a few tens of operations across the stages.
    const int64_t workers =
        B * H * W * 32 < kParallelGrainWork
            ? int64_t(1)
            : std::min<int64_t>(B, std::max<int64_t>(1, torch::stable::get_num_threads()));
    torch::stable::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<uint8_t> bin(H * W), tmp(H * W);
      std::vector<float> ftmp(H * W);
      std::vector<double> acc(W);
      std::vector<uint8_t> uniform(H);
      std::vector<int64_t> area;
      RunLabels L;
      for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) {
        threshold_image(ip + b * im.stride[0], C, H, W, im.stride[1], im.stride[2], im.stride[3], cw.data(),
                        cut, bin.data(), acc.data());
        morph_square<false>(bin.data(), tmp.data(), uniform, Hi, Wi,
                            static_cast<int>(open_radius));  // opening: erode,
        morph_square<true>(bin.data(), tmp.data(), uniform, Hi, Wi,
                           static_cast<int>(open_radius));  // then dilate
        morph_square<true>(bin.data(), tmp.data(), uniform, Hi, Wi,
                           static_cast<int>(close_radius));  // closing: dilate,
        morph_square<false>(bin.data(), tmp.data(), uniform, Hi, Wi,
                            static_cast<int>(close_radius));  // then erode
        const int64_t count = largest_component_one(bin.data(), Hi, Wi, fill_holes, L, area);
        cp[b] = static_cast<float>(static_cast<double>(count) / static_cast<double>(H * W));
        gaussian_smooth(bin.data(), mp + b * H * W, ftmp.data(), uniform, Hi, Wi, gw, tx, ty);
      }
    });
  };
  THO_DISPATCH_V2(images.scalar_type(), "foreground_mask_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Byte, st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return {mask, coverage};
}

}  // namespace

void largest_component_cpu(uint8_t* masks, int64_t B, int64_t H, int64_t W, bool fill_holes,
                           float* coverage) {
  if (H == 0 || W == 0) {
    for (int64_t b = 0; b < B; ++b) coverage[b] = 0.f;
    return;
  }
  MASKATTN_CHECK(H * W <= INT32_MAX, "foreground_mask: images of ", H, "x", W,
                 " pixels are too large (at most 2^31 - 1 pixels per image)");  // int run labels, see above
  torch::stable::parallel_for(0, B, grain_for(H * W * 8), [&](int64_t b0, int64_t b1) {
    RunLabels L;
    std::vector<int64_t> area;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t count = largest_component_one(masks + b * H * W, static_cast<int>(H), static_cast<int>(W),
                                                  fill_holes, L, area);
      coverage[b] = static_cast<float>(static_cast<double>(count) / static_cast<double>(H * W));
    }
  });
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("foreground_mask", TORCH_BOX(&maskattn::foreground_mask_cpu));
}
