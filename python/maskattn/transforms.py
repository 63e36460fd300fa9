"""Dataset transforms: a thermal-face loader's preprocessing mask (face kept, background set to a value) in one line.

transform = Compose([FaceMask("content_based"), ...])        # on tensors, ndarrays or PIL images
"""

import torch
from torch import Tensor

from . import _validation as _v
from .masks import content_based
from .masks.geometric import geometric

_KINDS = ("content_based", "ellipse", "rectangle", "adaptive")


def apply_face_mask(images: Tensor, mask: Tensor, background: float = 0.0) -> Tensor:
    """``images * mask + background * (1 - mask)``, in the images' dtype.

    images ``[..., C, H, W]`` or ``[..., H, W]`` (uint8 or floating); mask ``[H, W]`` or
    ``[B, H, W]``. ``background`` is in the images' units (0-255 for uint8). uint8 results are
    rounded and clamped.

    A bool or integer mask follows the mask rule: nonzero keeps the pixel (a 0/255 uint8 mask from
    OpenCV keeps it too, it does not scale it by 255). A floating mask is a blend weight in
    ``[0, 1]`` (``masks.content_based``'s soft edges), used by value: that is the one place where a
    float mask is not read as nonzero = valid.
    """
    fn = "apply_face_mask"
    _v.check_tensor(images, fn, "images")
    _v.check_mask(mask, fn, "mask")
    background = _v.as_float(background, fn, "background")
    dtype = torch.float32 if not images.is_floating_point() else images.dtype
    m = mask.to(device=images.device, dtype=dtype) if mask.is_floating_point() else (mask != 0).to(images.device, dtype)
    if images.dim() == 4 and m.dim() == 3:
        m = m[:, None]
    x = images if images.is_floating_point() else images.to(torch.float32)
    out = x * m + background * (1 - m)
    if not images.is_floating_point():
        info = torch.iinfo(images.dtype)
        out = out.round_().clamp_(info.min, info.max).to(images.dtype)
    return out


class FaceMask:
    """Mask the background of face images the way a thermal-face classifier's data loader does.

    Args:
        mask_type: ``"content_based"`` (default), ``"ellipse"``, ``"rectangle"`` or ``"adaptive"``.
        background: value given to the background (the loader's ``background_value``, 0 by default),
            in the image's units.
        **mask_kwargs: passed to ``maskattn.masks.content_based`` (threshold, radii, sigma,
            coverage bounds, fallback).

    Call it on a tensor ``[C, H, W]``, ``[H, W]`` or a batch ``[B, C, H, W]`` (uint8 or floating,
    CPU or CUDA), a numpy ``[H, W]`` / ``[H, W, C]`` array, or a PIL image; it returns the same kind.
    """

    def __init__(self, mask_type: str = "content_based", background: float = 0.0, **mask_kwargs):
        if not isinstance(mask_type, str) or mask_type not in _KINDS:
            raise ValueError(f"FaceMask: mask_type must be one of {_KINDS}, got {mask_type!r}")
        if mask_kwargs and mask_type != "content_based":
            raise ValueError(f"FaceMask: options {sorted(mask_kwargs)} only apply to mask_type='content_based'")
        _v.as_float(background, "FaceMask", "background")
        self.mask_type, self.background, self.mask_kwargs = mask_type, background, mask_kwargs

    def mask(self, images: Tensor) -> Tensor:
        """The mask for a ``[B, C, H, W]`` / ``[B, H, W]`` batch: ``[B, H, W]`` or ``[H, W]``."""
        if self.mask_type == "content_based":
            return content_based(images, **self.mask_kwargs)
        return geometric(self.mask_type, images.shape[-2], images.shape[-1], device=images.device)

    def _tensor(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return apply_face_mask(x, self.mask(x.unsqueeze(0)).reshape(x.shape), self.background)
        if x.dim() == 3:
            b = x.unsqueeze(0)
            return apply_face_mask(b, self.mask(b), self.background)[0]
        if x.dim() == 4:
            return apply_face_mask(x, self.mask(x), self.background)
        raise ValueError(f"FaceMask: tensor images must be [H, W], [C, H, W] or [B, C, H, W], got {tuple(x.shape)}")

    def __call__(self, image):
        if isinstance(image, Tensor):
            return self._tensor(image)
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        pil = None
        if np is not None and not isinstance(image, np.ndarray):
            try:
                from PIL import Image
            except ImportError:
                Image = None
            if Image is not None and isinstance(image, Image.Image):
                pil = image.mode
                image = np.asarray(image)
        if np is not None and isinstance(image, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(image))
            out = self._tensor(t if t.dim() == 2 else t.permute(2, 0, 1))
            arr = (out if out.dim() == 2 else out.permute(1, 2, 0)).contiguous().numpy()
            if pil is not None:
                from PIL import Image

                return Image.fromarray(arr)
            return arr
        raise TypeError(f"FaceMask: expected a tensor, numpy array or PIL image, got {type(image).__name__}")

    def __repr__(self) -> str:
        return f"FaceMask(mask_type={self.mask_type!r}, background={self.background})"
