#pragma once
// Shape contract of patch_mask, shared by all backends.
#include "common/stable.h"

namespace maskattn {

// Checked view of patch_mask's arguments: the image mask as [B, H, W] (a [B, 1, H, W] mask is
// viewed without its channel dim), in its own dtype and strides - nothing is copied.
struct PatchMaskInputs {
  st::View mask;   // [B, H, W], any dtype, any strides (of the image_mask tensor's data)
  int64_t p;       // patch size
  int64_t nh, nw;  // patches per column / row
};

PatchMaskInputs check_patch_mask_inputs(const st::Tensor& image_mask, int64_t patch_size, double threshold);

// Smallest count of valid pixels (out of p*p) that makes a patch valid: count > threshold * p*p.
// Computed once on the host in double so that every backend uses the same integer rule.
int64_t patch_min_count(int64_t patch_size, double threshold);

}  // namespace maskattn
