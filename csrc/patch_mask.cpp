// Schema of patch_mask and the argument checks every backend runs first.
#include "patch_mask.h"

#include <algorithm>
#include <cmath>

namespace maskattn {

PatchMaskInputs check_patch_mask_inputs(const st::Tensor& image_mask, int64_t patch_size, double threshold) {
  const st::View v = st::View::of(image_mask);
  MASKATTN_CHECK(v.ndim == 3 || (v.ndim == 4 && v.size[1] == 1),
                 "patch_mask: image_mask must be [B, H, W] or [B, 1, H, W], got shape ",
                 st::shape_str(image_mask));
  st::check_mask_dtype(image_mask, "patch_mask", "image_mask");
  MASKATTN_CHECK(patch_size > 0, "patch_mask: patch_size must be positive, got ", patch_size);
  MASKATTN_CHECK(std::isfinite(threshold) && threshold >= 0.0 && threshold <= 1.0,
                 "patch_mask: threshold must be in [0, 1], got ", threshold);
  PatchMaskInputs in;
  in.mask = v.ndim == 4 ? v.drop(1) : v;
  const int64_t H = in.mask.size[1], W = in.mask.size[2];
  MASKATTN_CHECK(H % patch_size == 0 && W % patch_size == 0, "patch_mask: image height H = ", H,
                 " and width W = ", W, " must both be multiples of patch_size = ", patch_size,
                 " (image_mask shape ", st::shape_str(image_mask), "); pad or crop the image first");
  in.p = patch_size;
  in.nh = H / patch_size;
  in.nw = W / patch_size;
  return in;
}

int64_t patch_min_count(int64_t patch_size, double threshold) {
  // Valid iff count / (p*p) > threshold, i.e. count > threshold * p*p, i.e. count >= floor(t*p*p) + 1.
  // threshold * p*p meant to be a whole number (0.29 * 100) may land just below it in binary; snap
  // such values to the integer so that "more than 29 of 100" is what 0.29 means.
  double t = threshold * static_cast<double>(patch_size) * static_cast<double>(patch_size);
  const double r = std::nearbyint(t);
  if (std::abs(t - r) <= 1e-9 * std::max(1.0, r)) t = r;
  return static_cast<int64_t>(std::floor(t)) + 1;
}

}  // namespace maskattn

STABLE_TORCH_LIBRARY_FRAGMENT(maskattn, m) {
  m.def("patch_mask(Tensor image_mask, int patch_size, float threshold=0.5) -> Tensor");
}
