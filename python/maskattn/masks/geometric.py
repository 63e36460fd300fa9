"""Geometric face masks of a thermal-face classifier (ellipse, rectangle, adaptive), any device/dtype.

Pixel (i, j) is sampled at its centre ``(j + 0.5, i + 0.5)`` and the shapes are centred on
``(w / 2, h / 2)``, so every mask is symmetric under flips and does not shift by half a pixel
between even and odd sizes.
"""

import math
import numbers

import torch
from torch import Tensor


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(name: str, h: int, w: int, **fracs: float) -> None:
    # SymInt: sizes read off a tensor under torch.compile(dynamic=True).
    ints = all(isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in (h, w))
    if not ints or h < 0 or w < 0:
        raise ValueError(f"masks.{name}: h and w must be non-negative ints, got h={h!r}, w={w!r}")
    for k, v in fracs.items():
        # abs(v) != inf rather than math.isfinite: Dynamo folds it on constants without a break.
        if not (_is_real(v) and abs(v) != math.inf and v > 0):
            raise ValueError(f"masks.{name}: {k} must be a positive finite number, got {v!r}")


def _centred_grid(h: int, w: int, device) -> "tuple[Tensor, Tensor]":
    # Offsets from the centre, in pixels, computed in float32 whatever the output dtype: half
    # precision cannot represent pixel centres of large images exactly.
    y = torch.arange(h, device=device, dtype=torch.float32).add_(0.5 - h / 2).view(h, 1)
    x = torch.arange(w, device=device, dtype=torch.float32).add_(0.5 - w / 2).view(1, w)
    return y, x


def _ellipse_bool(h, w, ax, ay, device) -> Tensor:
    y, x = _centred_grid(h, w, device)
    return (x / (ax * w)).square() + (y / (ay * h)).square() <= 1.0


def _rectangle_bool(h, w, fx, fy, device) -> Tensor:
    y, x = _centred_grid(h, w, device)
    return (x.abs() <= fx * w / 2) & (y.abs() <= fy * h / 2)


def ellipse(
    h: int, w: int, ax: float = 0.35, ay: float = 0.40, *, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[h, w]`` mask of the centred ellipse with semi-axes ``ax * w`` (horizontal) and ``ay * h``.

    The classifier's default covers ``pi * 0.35 * 0.40 ~ 44%`` of the image. 1 inside, 0 outside, in
    ``dtype`` (bool allowed).
    """
    _check("ellipse", h, w, ax=ax, ay=ay)
    return _ellipse_bool(h, w, ax, ay, device).to(dtype)


def rectangle(
    h: int, w: int, fx: float = 0.70, fy: float = 0.80, *, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[h, w]`` mask of the central ``fx * w`` by ``fy * h`` rectangle (the classifier's 70% x 80%: 56%)."""
    _check("rectangle", h, w, fx=fx, fy=fy)
    return _rectangle_bool(h, w, fx, fy, device).to(dtype)


def adaptive(
    h: int,
    w: int,
    ax: float = 0.35,
    ay: float = 0.40,
    fx: float = 0.70,
    fy: float = 0.80,
    extension: float = 0.5,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[h, w]`` ellipse core plus rectangle extension: 1 inside the ellipse, ``extension`` in the
    rectangle outside it, 0 elsewhere.

    The classifier describes "adaptive" as an ellipse core with a rectangular extension. With the default
    sizes the ellipse is inscribed in the rectangle, so a binary union would just be the rectangle;
    the extension therefore gets a lower weight (0.5 by default): the face centre counts fully, the
    corners of the central rectangle half. ``extension=1`` gives the plain union; a bool ``dtype``
    gives the support (nonzero part) of the mask.
    """
    _check("adaptive", h, w, ax=ax, ay=ay, fx=fx, fy=fy)
    if not (_is_real(extension) and 0.0 <= extension <= 1.0):
        raise ValueError(f"masks.adaptive: extension must be in [0, 1], got {extension!r}")
    core = _ellipse_bool(h, w, ax, ay, device)
    ext = _rectangle_bool(h, w, fx, fy, device)
    if dtype == torch.bool:
        return core | (ext & (extension > 0))
    out = torch.where(core, 1.0, torch.where(ext, float(extension), 0.0))
    return out.to(dtype)


_GEOMETRIC = {"ellipse": ellipse, "rectangle": rectangle, "adaptive": adaptive}


def geometric(kind: str, h: int, w: int, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The classifier's ``generate_face_mask((h, w), mask_type=kind)`` with default sizes."""
    if not isinstance(kind, str) or kind not in _GEOMETRIC:
        raise ValueError(f"masks.geometric: kind must be one of {sorted(_GEOMETRIC)}, got {kind!r}")
    return _GEOMETRIC[kind](h, w, device=device, dtype=dtype)
