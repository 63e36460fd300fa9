from typing import Optional

import torch
from torch import Tensor, nn

from .. import _validation as _v
from .._ops.gated_masked_mean import gated_masked_mean

_NAME = "SpatialAttentionPool"


def _cells(size: int, out: int, device) -> "tuple[Tensor, Tensor]":
    # adaptive_avg_pool2d's regions: cell i covers [floor(i * size / out), ceil((i + 1) * size / out)),
    # so neighbouring cells overlap by a pixel when out does not divide size.
    i = torch.arange(out, device=device)
    return (i * size) // out, ((i + 1) * size + out - 1) // out


def _segment_sums(prefix: Tensor, dim: int, start: Tensor, end: Tensor) -> Tensor:
    """Sums over ``[start, end)`` along ``dim`` from inclusive prefix sums (no padded copy of them)."""
    total = prefix.index_select(dim, end - 1)
    before = prefix.index_select(dim, (start - 1).clamp(min=0))
    shape = [1] * prefix.dim()
    shape[dim] = -1
    return total - torch.where((start > 0).view(shape), before, 0)


def _region_counts(valid: Tensor, H: int, W: int) -> "tuple[Tensor, Tensor]":
    """Valid-pixel count ``[B, H, W]`` and pixel count ``[H, W]`` of every feature cell.

    Integer prefix sums (exact counts, no averaging of values) gathered at the cell bounds: written
    with cumsum and index_select so that every size may be symbolic under torch.compile(dynamic=True),
    which adaptive_avg_pool2d's inductor lowering does not allow.
    """
    h0, h1 = _cells(valid.shape[1], H, valid.device)
    w0, w1 = _cells(valid.shape[2], W, valid.device)
    # int32 counts are exact for masks of up to 2^31 pixels per image.
    rows = _segment_sums(valid.cumsum(2, dtype=torch.int32), 2, w0, w1)  # [B, Hm, W]
    count = _segment_sums(rows.cumsum(1, dtype=torch.int32), 1, h0, h1)  # [B, H, W]
    area = (h1 - h0)[:, None] * (w1 - w0)[None, :]
    return count, area


def _more_than(count: Tensor, area: Tensor, threshold: float) -> Tensor:
    """``count / area > threshold`` exactly as ``patch_mask`` decides it: ``count >= floor(t) + 1``
    with ``t = threshold * area``, snapped to the integer when it is one up to rounding (0.29 * 100)."""
    t = area.to(torch.float64) * threshold
    r = torch.round(t)
    t = torch.where((t - r).abs() <= 1e-9 * r.clamp(min=1.0), r, t)
    return count >= torch.floor(t) + 1


class SpatialAttentionPool(nn.Module):
    """Spatial attention gate + global average pooling of a thermal-face classifier, fused and mask-aware.

    The classifier computes ``attention = attention_conv(features)`` (conv 3x3 -> ReLU -> conv 1x1 ->
    sigmoid), then ``adaptive_avg_pool2d(features * attention, 1)``. Here the two convolutions give
    the gate logits and one fused op (``torch.ops.maskattn.gated_masked_mean``) applies the sigmoid
    and pools, never materialising ``features * attention``.

    Args:
        channels: feature channels C (512 for a ResNet-18/34 trunk).
        hidden: hidden channels of the gate (the classifier's 256).
        mask_threshold: in [0, 1]. An image-resolution mask is reduced to feature resolution by
            counting: a feature cell is valid when *more than* this fraction of its pixels are
            valid (nonzero), ``patch_mask``'s rule. The cells are ``adaptive_avg_pool2d``'s regions
            (exact ``Hm / H`` by ``Wm / W`` patches when the sizes divide, and then the result is
            ``patch_mask``'s); the mask's values are never averaged, so a soft mask (0.4 at a
            blurred edge) is as valid as 1 there.

    Parameters are ``attention_conv.0`` (Conv2d C->hidden, 3x3, padding 1) and ``attention_conv.2``
    (Conv2d hidden->1, 1x1), exactly the classifier's ``attention_conv`` Sequential, so its checkpoint
    loads unchanged (``attention_conv.3`` is its parameter-free Sigmoid, kept for that
    numbering and used only when calling ``attention_conv`` directly).

    ``forward(features [B, C, H, W], mask=None)`` returns ``(pooled [B, C], attention [B, 1, H, W])``.
    Without a mask it equals the classifier's module. ``mask`` is ``[B, H, W]`` (or ``[B, 1, H, W]``) of
    any bool, integer or floating dtype (nonzero = valid), at feature resolution or larger (image
    resolution); pooled averages ``attention * features`` over the valid cells only, attention is
    0 at invalid cells, and a sample with no valid cell pools to zeros.
    """

    def __init__(self, channels: int, hidden: int = 256, mask_threshold: float = 0.5):
        super().__init__()
        channels = _v.as_int(channels, _NAME, "channels", min_value=1)
        hidden = _v.as_int(hidden, _NAME, "hidden", min_value=1)
        mask_threshold = _v.as_float(mask_threshold, _NAME, "mask_threshold", low=0.0, high=1.0)
        self.channels, self.hidden, self.mask_threshold = channels, hidden, mask_threshold
        self.attention_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.Sigmoid(),
        )

    def gate_logits(self, features: Tensor) -> Tensor:
        """Pre-sigmoid attention ``[B, 1, H, W]``."""
        conv1, relu, conv2 = self.attention_conv[0], self.attention_conv[1], self.attention_conv[2]
        return conv2(relu(conv1(features)))

    def feature_mask(self, mask: Tensor, features: Tensor) -> Tensor:
        """bool ``[B, H, W]``: ``mask != 0`` at the features' resolution, or counted per cell
        (valid when more than ``mask_threshold`` of its pixels are nonzero) from a larger mask."""
        _v.check_mask(mask, _NAME, "mask")
        _v.check_same_device(mask, "mask", features, "features", _NAME)
        B, _, H, W = features.shape
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3 or mask.shape[0] != B:
            raise ValueError(f"{_NAME}: mask must be [B, H, W] with B = {B}, got shape {tuple(mask.shape)}")
        valid = mask if mask.dtype == torch.bool else mask != 0
        if valid.shape[1] == H and valid.shape[2] == W:
            return valid
        if valid.shape[1] < H or valid.shape[2] < W:
            raise ValueError(
                f"{_NAME}: mask {tuple(mask.shape)} is neither at feature resolution "
                f"({H}, {W}) nor larger (image resolution)"
            )
        count, area = _region_counts(valid, H, W)
        return _more_than(count, area, self.mask_threshold)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None):
        _v.check_floating(features, _NAME, "features")
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(f"{_NAME}: features must be [B, {self.channels}, H, W], got shape {tuple(features.shape)}")
        logits = self.gate_logits(features)
        if mask is not None:
            mask = self.feature_mask(mask, features)
        return gated_masked_mean(features, logits, mask)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, mask_threshold={self.mask_threshold}"
