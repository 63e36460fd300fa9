from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._ops.gated_masked_mean import gated_masked_mean


class SpatialAttentionPool(nn.Module):
    """Spatial attention gate + global average pooling of seed 004, fused and mask-aware.

    The seed computes ``attention = attention_conv(features)`` (conv 3x3 -> ReLU -> conv 1x1 ->
    sigmoid), then ``adaptive_avg_pool2d(features * attention, 1)``. Here the two convolutions give
    the gate logits and one fused op (``torch.ops.maskattn.gated_masked_mean``) applies the sigmoid
    and pools, never materialising ``features * attention``.

    Args:
        channels: feature channels C (512 for a ResNet-18/34 trunk).
        hidden: hidden channels of the gate (the seed's 256).
        mask_threshold: an image-resolution mask is reduced to feature resolution by area; a feature
            cell is valid when more than this fraction of it is valid (``patch_mask``'s rule).

    Parameters are ``attention_conv.0`` (Conv2d C->hidden, 3x3, padding 1) and ``attention_conv.2``
    (Conv2d hidden->1, 1x1), exactly the seed's ``attention_conv`` Sequential, so its checkpoint
    loads unchanged (``attention_conv.3`` is the seed's parameter-free Sigmoid, kept for that
    numbering and used only when calling ``attention_conv`` directly).

    ``forward(features [B, C, H, W], mask=None)`` returns ``(pooled [B, C], attention [B, 1, H, W])``.
    Without a mask it equals the seed's module. ``mask`` is ``[B, H, W]`` (or ``[B, 1, H, W]``) of
    any dtype, at feature resolution (nonzero = valid) or at image resolution; pooled averages
    ``attention * features`` over the valid cells only, attention is 0 at invalid cells, and a
    sample with no valid cell pools to zeros.
    """

    def __init__(self, channels: int, hidden: int = 256, mask_threshold: float = 0.5):
        super().__init__()
        if channels <= 0 or hidden <= 0:
            raise ValueError(f"SpatialAttentionPool: channels and hidden must be positive, got {channels}, {hidden}")
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
        """``mask`` at the features' resolution: kept as is, or area-reduced and thresholded."""
        B, _, H, W = features.shape
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3 or mask.shape[0] != B:
            raise ValueError(
                f"SpatialAttentionPool: mask must be [B, H, W] with B = {B}, got shape {tuple(mask.shape)}"
            )
        if tuple(mask.shape[1:]) == (H, W):
            return mask
        if mask.shape[1] < H or mask.shape[2] < W:
            raise ValueError(
                f"SpatialAttentionPool: mask {tuple(mask.shape)} is neither at feature resolution "
                f"({H}, {W}) nor larger (image resolution)"
            )
        frac = F.adaptive_avg_pool2d(
            (mask != 0).to(torch.float32).unsqueeze(1)
            if mask.dtype == torch.bool or not mask.is_floating_point()
            else mask.to(torch.float32).unsqueeze(1),
            (H, W),
        )
        return frac[:, 0] > self.mask_threshold

    def forward(self, features: Tensor, mask: Optional[Tensor] = None):
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"SpatialAttentionPool: features must be [B, {self.channels}, H, W], got shape {tuple(features.shape)}"
            )
        logits = self.gate_logits(features)
        if mask is not None:
            mask = self.feature_mask(mask, features)
        return gated_masked_mean(features, logits, mask)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"
