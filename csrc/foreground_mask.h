#pragma once
// Shape contract of foreground_mask (content-based face masks), shared by all backends, and the
// CPU connected-component stage, which the CUDA backend reuses on a host copy.
#include "common/stable.h"

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
st::View check_foreground_inputs(const st::Tensor& images, const ForegroundParams& p);

// Taps each side of the smoothing kernel: ceil(3 sigma), the +-3 sigma support.
int64_t gaussian_radius(double sigma);
// Normalised 1-D Gaussian weights, 2 * gaussian_radius(sigma) + 1 of them.
std::vector<float> gaussian_weights(double sigma);

// Grey level of channel mix: one channel as is; three or four (RGB[A]) by ITU-R BT.601 luma as
// cv2.COLOR_RGB2GRAY; any other count by the mean. The grey level is computed in float64 from the
// pixel values as stored (uint8 0-255, floating 0-1), every product and sum rounded on its own (no
// FMA contraction, on the CPU as on CUDA), in channel order:
//   C = 3, 4: (0.299 * R + 0.587 * G) + 0.114 * B     (alpha ignored)
//   C = 1: the value; other C: (x_0 + x_1 + ... + x_{C-1}) / C
// and a pixel is foreground when grey / full_scale > threshold (full_scale 255 for uint8, 1
// otherwise), all in float64: the same arithmetic as the pure-PyTorch float64 reference, so the
// binary mask matches it exactly, also at the threshold's edge (docs/numerics.md).
void grey_weights(int64_t C, double* w /* [C]; unused for other C (the mean) */);

// The smallest float64 grey level g with g / full_scale > threshold, so that the kernels test
// g >= cut instead of dividing every pixel (the division is monotone: the two tests agree for
// every g, NaN included, which is foreground under neither).
double foreground_cut(double threshold, double full_scale);

// In place on B contiguous HxW binary (0/1) masks: keep only the largest 8-connected foreground
// component (ties: the one met first in raster order), optionally fill its holes (background
// regions not 4-connected to the border), and write each mask's foreground fraction to
// coverage[b]. Parallel over the batch.
void largest_component_cpu(uint8_t* masks, int64_t B, int64_t H, int64_t W, bool fill_holes, float* coverage);

}  // namespace maskattn
