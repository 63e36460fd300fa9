"""patch_mask (image mask -> patch mask) and its inverse, patch_mask_to_image."""

from typing import Tuple, Union

import torch
from torch import Tensor

from .. import _validation as _v
from . import _autograd

_ops = torch.ops.maskattn


def patch_mask(image_mask: Tensor, patch_size: int, threshold: float = 0.5) -> Tensor:
    """Patch-level valid mask of a padded image batch, in one pass over the image mask.

    Args:
        image_mask: ``[B, H, W]`` (or ``[B, 1, H, W]``) valid mask of any bool, integer or
            floating dtype: nonzero = valid pixel (NaN included). H and W must be multiples of
            ``patch_size``; images may be rectangular.
        patch_size: p, the side of a square patch.
        threshold: a patch is valid when the *fraction* of its p*p pixels that are valid is strictly
            greater than ``threshold``. The default 0.5 is the JiT rule ``mask.reshape(B, n, p, n,
            p).mean((2, 4)) > 0.5``; ``threshold=0`` keeps every patch with any valid pixel.

    Returns:
        bool ``[B, (H/p) * (W/p)]``, patches in row-major order (the order of ``patchify``).

    Unlike the reshape-mean rule, pixels are counted as valid or not (nonzero), so a soft float mask
    (e.g. 0.6 at a blurred border) counts as valid where the mean rule would weigh it; for 0/1 masks
    the two agree exactly.
    """
    _v.reject_complex(image_mask, "patch_mask", "image_mask")
    # a bool would pass the op's int argument as a patch size of 0 or 1
    patch_size = _v.as_int(patch_size, "patch_mask", "patch_size")
    return _ops.patch_mask(image_mask, patch_size, threshold)


def patch_mask_to_image(patch_mask: Tensor, patch_size: int, image_size: Union[int, Tuple[int, int]]) -> Tensor:
    """Inverse of :func:`patch_mask`: bool ``[B, H, W]`` with every pixel of a valid patch valid.

    This is the pixel mask that the model actually trained on (whole patches), for a masked loss on
    ``unpatchify``'d predictions. It is a view-and-expand, differentiable-free and sync-free.

    Args:
        patch_mask: ``[B, (H/p) * (W/p)]`` of any dtype (nonzero = valid), without condition tokens.
        patch_size: p.
        image_size: ``H`` (square) or ``(H, W)``.
    """
    fn = "patch_mask_to_image"
    _v.check_mask(patch_mask, fn, "patch_mask")
    p = _v.as_int(patch_size, fn, "patch_size")
    if p <= 0:
        raise ValueError(f"{fn}: patch_size must be positive, got {patch_size}")
    if isinstance(image_size, (int, torch.SymInt)) and not isinstance(image_size, bool):
        h = w = image_size
    elif isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2:
        h, w = image_size
    else:
        raise TypeError(f"{fn}: image_size must be an int H or a pair (H, W), got {image_size!r}")
    h, w = _v.as_int(h, fn, "image_size"), _v.as_int(w, fn, "image_size")
    if h < 0 or w < 0:
        raise ValueError(f"{fn}: image_size must be non-negative, got {image_size}")
    if h % p or w % p:
        raise ValueError(f"patch_mask_to_image: image height H={h} and width W={w} must be multiples of patch_size={p}")
    nh, nw = h // p, w // p
    if patch_mask.dim() != 2 or patch_mask.shape[1] != nh * nw:
        raise ValueError(
            f"patch_mask_to_image: patch_mask must be [B, {nh * nw}] for a {h}x{w} image with "
            f"patch_size={p}, got shape {tuple(patch_mask.shape)}"
        )
    valid = _v.valid_mask(patch_mask, fn, "patch_mask")
    b = valid.shape[0]
    return valid.reshape(b, nh, 1, nw, 1).expand(b, nh, p, nw, p).reshape(b, h, w)


def _check_fake(image_mask, patch_size, threshold):
    torch._check(
        image_mask.dim() == 3 or (image_mask.dim() == 4 and image_mask.shape[1] == 1),
        lambda: f"patch_mask: image_mask must be [B, H, W] or [B, 1, H, W], got {tuple(image_mask.shape)}",
    )
    torch._check(
        not image_mask.is_complex(),
        lambda: f"patch_mask: image_mask must be a bool, integer or floating tensor, got {image_mask.dtype}",
    )
    torch._check(patch_size > 0, lambda: f"patch_mask: patch_size must be positive, got {patch_size}")
    torch._check(0.0 <= threshold <= 1.0, lambda: f"patch_mask: threshold must be in [0, 1], got {threshold}")
    h, w = image_mask.shape[-2], image_mask.shape[-1]
    torch._check(
        h % patch_size == 0 and w % patch_size == 0,
        lambda: (
            f"patch_mask: image height H = {h} and width W = {w} must both be multiples of patch_size = {patch_size}"
        ),
    )
    return h // patch_size, w // patch_size


@torch.library.register_fake("maskattn::patch_mask")
def _(image_mask, patch_size, threshold=0.5):
    nh, nw = _check_fake(image_mask, patch_size, threshold)
    return image_mask.new_empty((image_mask.shape[0], nh * nw), dtype=torch.bool)


def _vmap(info, in_dims, image_mask, patch_size, threshold):
    V = info.batch_size
    return _autograd.unfold(_ops.patch_mask(_autograd.fold(image_mask, in_dims[0], V), patch_size, threshold), V), 0


_autograd.register_vmap_only("patch_mask", _vmap)
