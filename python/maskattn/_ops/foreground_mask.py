"""foreground_mask: the thermal-face classifier's content-based face mask as one batched op (wrapper + fake kernel)."""

from typing import Tuple

import torch
from torch import Tensor

from .. import _validation as _v
from . import _autograd

_ops = torch.ops.maskattn


def foreground_mask(
    images: Tensor,
    threshold: float = 0.1,
    open_radius: int = 1,
    close_radius: int = 2,
    fill_holes: bool = True,
    sigma: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """Soft foreground mask of dark-background images, without the coverage check.

    Args:
        images: ``[B, C, H, W]`` or ``[B, H, W]``, uint8 (full scale 255) or floating (full scale 1),
            any strides. Three or four channels are mixed to grey by BT.601 luma (as
            ``cv2.COLOR_RGB2GRAY``), one is used as is, other counts are averaged.
        threshold: a pixel is foreground when its grey level is ``> threshold * full scale``.
        open_radius / close_radius: opening, then closing, with ``(2r+1) x (2r+1)`` squares
            (pixels outside the image are ignored, as OpenCV's default border does). 0 skips.
        fill_holes: fill background regions of the kept component that do not reach the border.
        sigma: Gaussian smoothing of the binary mask (``2*ceil(3 sigma)+1`` taps, reflect-101
            border as ``cv2.GaussianBlur``); 0 returns the binary mask as float.

    Returns:
        ``(mask, coverage)``: float32 ``[B, H, W]`` in ``[0, 1]`` and float32 ``[B]``, the fraction
        of pixels in the binary mask (largest 8-connected component, holes filled) before smoothing.
    """
    # Types only (int() would silently truncate a radius of 1.5); the ranges are the op's checks.
    fn = "foreground_mask"
    return _ops.foreground_mask(
        images,
        _v.as_float(threshold, fn, "threshold", allow_inf=True),
        _v.as_int(open_radius, fn, "open_radius"),
        _v.as_int(close_radius, fn, "close_radius"),
        _v.as_bool(fill_holes, fn, "fill_holes"),
        _v.as_float(sigma, fn, "sigma", allow_inf=True),
    )


@torch.library.register_fake("maskattn::foreground_mask")
def _(images, threshold=0.1, open_radius=1, close_radius=2, fill_holes=True, sigma=1.0):
    torch._check(
        images.dim() in (3, 4),
        lambda: f"foreground_mask: images must be [B, C, H, W] or [B, H, W], got {tuple(images.shape)}",
    )
    torch._check(
        images.dtype in (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16),
        lambda: f"foreground_mask: images must be uint8, float32, float64, float16 or bfloat16, got {images.dtype}",
    )
    B, H, W = images.shape[0], images.shape[-2], images.shape[-1]
    mask = images.new_empty((B, H, W), dtype=torch.float32)
    coverage = images.new_empty((B,), dtype=torch.float32)
    return mask, coverage


def _vmap(info, in_dims, images, *options):
    V = info.batch_size
    mask, coverage = _ops.foreground_mask(_autograd.fold(images, in_dims[0], V), *options)
    return (_autograd.unfold(mask, V), _autograd.unfold(coverage, V)), (0, 0)


_autograd.register_vmap_only("foreground_mask", _vmap)
