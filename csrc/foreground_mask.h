#pragma once
// Shape contract of foreground_mask (content-based face masks), shared by all backends, and the
// CPU connected-component stage, which the CUDA backend reuses on a host copy.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace maskattn {

struct ForegroundParams {
  double threshold;      // fraction of full scale (255 for uint8, 1.0 for floating images)
  int64_t open_radius;   // opening with a (2r+1)x(2r+1) square; 0 = none
  int64_t close_radius;  // closing with a (2r+1)x(2r+1) square; 0 = none
  bool fill_holes;
  double sigma;  // Gaussian edge smoothing; 0 = none (binary output)
};

// images viewed as [B, C, H, W] (a [B, H, W] input gets C = 1); nothing is copied.
at::Tensor check_foreground_inputs(const at::Tensor& images, const ForegroundParams& p);

// Taps each side of the smoothing kernel: ceil(3 sigma), the +-3 sigma support.
int64_t gaussian_radius(double sigma);
// Normalised 1-D Gaussian weights, 2 * gaussian_radius(sigma) + 1 of them.
std::vector<float> gaussian_weights(double sigma);

// Grey level of channel mix: one channel as is; three or four (RGB[A]) by ITU-R BT.601 luma as
// cv2.COLOR_RGB2GRAY; any other count by the mean.
void grey_weights(int64_t C, float* w /* [C] */);

// In place on B contiguous HxW binary (0/1) masks: keep only the largest 8-connected foreground
// component (ties: the one met first in raster order), optionally fill its holes (background
// regions not 4-connected to the border), and write each mask's foreground fraction to
// coverage[b]. Parallel over the batch.
void largest_component_cpu(uint8_t* masks, int64_t B, int64_t H, int64_t W, bool fill_holes, float* coverage);

}  // namespace maskattn
