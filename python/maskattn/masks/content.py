"""Content-based face masks (a thermal-face pipeline's generate_smart_face_mask), batched on CPU or CUDA."""

from typing import Union

import torch
from torch import Tensor

from .. import _validation as _v
from .._ops.foreground_mask import foreground_mask
from .geometric import geometric

# Geometric fallbacks by (kind, H, W, device): a data loader asks for the same one for every batch,
# and building it costs as much as masking a small batch. Cached tensors are only ever read.
_FALLBACKS = {}
_KINDS = ("ellipse", "rectangle", "adaptive")


def _fallback(fallback, H: int, W: int, device):
    if fallback is None or isinstance(fallback, Tensor):
        return fallback
    if torch.compiler.is_compiling():
        return geometric(fallback, H, W, device=device)
    key = (fallback, H, W, str(device))
    fb = _FALLBACKS.get(key)
    if fb is None:
        if len(_FALLBACKS) >= 64:
            _FALLBACKS.clear()
        fb = _FALLBACKS[key] = geometric(fallback, H, W, device=device)
    return fb


def content_based(
    images: Tensor,
    threshold: float = 0.1,
    open_radius: int = 1,
    close_radius: int = 2,
    fill_holes: bool = True,
    sigma: float = 1.0,
    min_coverage: float = 0.1,
    max_coverage: float = 0.8,
    fallback: Union[str, Tensor, None] = "ellipse",
    return_info: bool = False,
):
    """Soft face masks ``[B, H, W]`` (float32 in ``[0, 1]``) of black-background images.

    Per image: grey level ``> threshold`` of full scale -> opening (``2*open_radius+1`` square) ->
    closing (``2*close_radius+1`` square) -> largest 8-connected component -> hole filling ->
    Gaussian-smoothed edges (``sigma``). The defaults are that pipeline's (0.1, 3x3, 5x5, holes filled,
    sigma 1). When the binary mask covers less than ``min_coverage`` or more than ``max_coverage``
    of the image (a blank, failed or all-foreground image) the image gets ``fallback`` instead:
    ``"ellipse"`` (default), ``"rectangle"``, ``"adaptive"``, an ``[H, W]`` or ``[B, H, W]``
    tensor (floating: a soft mask used by value; bool or integer: nonzero = 1), or None to keep
    the content mask regardless.

    Args:
        images: ``[B, C, H, W]`` or ``[B, H, W]``, uint8 or floating, CPU or CUDA. Deterministic;
            parallel over the batch on CPU. On CUDA the connected-component stage runs on a host
            copy of the binary masks (one device-to-host and one host-to-device copy of B*H*W bytes,
            which synchronises the stream); the other stages run on the GPU.
        return_info: also return ``coverage`` (float32 ``[B]``) and ``accepted`` (bool ``[B]``,
            False where the fallback was used).
    """
    if not isinstance(images, Tensor) or images.dim() not in (3, 4):
        raise ValueError(
            f"content_based: images must be a [B, C, H, W] or [B, H, W] tensor, got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    fn = "content_based"
    _v.as_float(threshold, fn, "threshold")
    _v.as_int(open_radius, fn, "open_radius", min_value=0)
    _v.as_int(close_radius, fn, "close_radius", min_value=0)
    _v.as_bool(fill_holes, fn, "fill_holes")
    _v.as_float(sigma, fn, "sigma", low=0.0)
    min_coverage = _v.as_float(min_coverage, fn, "min_coverage", low=0.0, high=1.0)
    max_coverage = _v.as_float(max_coverage, fn, "max_coverage", low=0.0, high=1.0)
    return_info = _v.as_bool(return_info, fn, "return_info")
    if isinstance(fallback, Tensor):
        _v.check_mask(fallback, fn, "fallback")
    elif fallback is not None and (not isinstance(fallback, str) or fallback not in _KINDS):
        raise ValueError(
            f"{fn}: fallback must be one of {_KINDS}, an [H, W] or [B, H, W] tensor or None, got {fallback!r}"
        )
    if not (0.0 <= min_coverage <= max_coverage <= 1.0):
        raise ValueError(
            f"content_based: need 0 <= min_coverage <= max_coverage <= 1, got "
            f"min_coverage={min_coverage}, max_coverage={max_coverage}"
        )
    mask, coverage = foreground_mask(images, threshold, open_radius, close_radius, fill_holes, sigma)
    H, W = images.shape[-2], images.shape[-1]
    fb = _fallback(fallback, H, W, images.device)
    accepted = (coverage >= min_coverage) & (coverage <= max_coverage)
    # On CPU, checking whether any image needs the fallback costs nothing (no device sync) and
    # saves a full pass over the masks in the common case; CUDA and compiled graphs always select.
    if fb is not None and (
        fb.dim() not in (2, 3) or tuple(fb.shape[-2:]) != (H, W) or (fb.dim() == 3 and fb.shape[0] != images.shape[0])
    ):
        raise ValueError(
            f"content_based: fallback must be [H, W] = [{H}, {W}] or [B, H, W], got shape {tuple(fb.shape)}"
        )
    skip = fb is None or (images.device.type == "cpu" and not torch.compiler.is_compiling() and bool(accepted.all()))
    if not skip:
        # A floating fallback is a soft mask, used by value like the content mask; a bool or integer
        # one follows the mask rule (nonzero = 1).
        fb = fb if fb.is_floating_point() else fb != 0
        mask = torch.where(accepted.view(-1, 1, 1), mask, fb.to(device=mask.device, dtype=mask.dtype))
    if return_info:
        return mask, coverage, accepted
    return mask
