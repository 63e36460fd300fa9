// Schema of foreground_mask and the argument checks every backend runs first.
#include "foreground_mask.h"

#include <cmath>
#include <limits>

namespace maskattn {

st::View check_foreground_inputs(const st::Tensor& images, const ForegroundParams& p) {
  MASKATTN_CHECK(images.dim() == 3 || images.dim() == 4,
                 "foreground_mask: images must be [B, C, H, W] or [B, H, W], got shape ",
                 st::shape_str(images));
  using ST = st::ScalarType;
  const ST s = images.scalar_type();
  MASKATTN_CHECK(s == ST::Byte || s == ST::Float || s == ST::Double || s == ST::Half || s == ST::BFloat16,
                 "foreground_mask: images must be uint8, float32, float64, float16 or bfloat16, got ",
                 torch::headeronly::toString(s));
  MASKATTN_CHECK(std::isfinite(p.threshold), "foreground_mask: threshold must be finite, got ", p.threshold);
  // Radii beyond 64 are a 129x129 structuring element: certainly a units mistake, and it bounds work.
  MASKATTN_CHECK(p.open_radius >= 0 && p.open_radius <= 64,
                 "foreground_mask: open_radius must be in [0, 64], got ", p.open_radius);
  MASKATTN_CHECK(p.close_radius >= 0 && p.close_radius <= 64,
                 "foreground_mask: close_radius must be in [0, 64], got ", p.close_radius);
  MASKATTN_CHECK(std::isfinite(p.sigma) && p.sigma >= 0 && p.sigma <= 20,
                 "foreground_mask: sigma must be in [0, 20], got ", p.sigma);
  st::View im = st::View::of(images);
  if (im.ndim == 3) im = im.insert(1);
  MASKATTN_CHECK(im.size[1] >= 1, "foreground_mask: images need at least one channel, got shape ",
                 st::shape_str(images));
  // Row lengths and pixel counts are int inside the kernels (run coordinates, union-find indices).
  MASKATTN_CHECK(im.size[2] < (int64_t(1) << 30) && im.size[3] < (int64_t(1) << 30) &&
                     im.size[2] * im.size[3] < (int64_t(1) << 31),
                 "foreground_mask: images of shape ", st::shape_str(images),
                 " are too large (H*W must be < 2^31)");
  return im;
}

int64_t gaussian_radius(double sigma) {
  return sigma > 0 ? static_cast<int64_t>(std::ceil(3.0 * sigma)) : 0;
}

std::vector<float> gaussian_weights(double sigma) {
  const int64_t r = gaussian_radius(sigma);
  std::vector<double> w(2 * r + 1, 1.0);
  double s = 0;
  for (int64_t k = -r; k <= r; ++k) {
    w[k + r] = sigma > 0 ? std::exp(-0.5 * double(k * k) / (sigma * sigma)) : 1.0;
    s += w[k + r];
  }
  std::vector<float> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = static_cast<float>(w[i] / s);
  return out;
}

void grey_weights(int64_t C, double* w) {
  if (C == 3 || C == 4) {
    w[0] = 0.299;
    w[1] = 0.587;
    w[2] = 0.114;
    if (C == 4) w[3] = 0.0;  // alpha does not count as intensity
  }
}

double foreground_cut(double threshold, double full_scale) {
  auto fg = [&](double g) { return g / full_scale > threshold; };
  const double inf = std::numeric_limits<double>::infinity();
  double g = threshold * full_scale;
  if (g != g) g = 0.0;  // cannot happen for a finite threshold; keeps the loops finite regardless
  // Monotone predicate: walk to its first true value (inf / full_scale > threshold always holds).
  while (!fg(g)) g = std::nextafter(g, inf);
  while (g > -inf && fg(std::nextafter(g, -inf))) g = std::nextafter(g, -inf);
  return g;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  // Not differentiable: the output is a (smoothed) segmentation of the input.
  m.def(
      "foreground_mask(Tensor images, float threshold=0.1, int open_radius=1, int close_radius=2, "
      "bool fill_holes=True, float sigma=1.0) -> (Tensor mask, Tensor coverage)");
}
