"""Losses over padded batches."""

import torch
from torch import Tensor

from . import _validation as _v

_NAME = "masked_mse_loss"


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error over the valid elements of a padded image batch.

    Args:
        pred, target: ``[B, C, H, W]`` (or any ``[B, C, *spatial]``), same shape.
        mask: valid mask of any bool, integer or floating dtype (nonzero = valid pixel, NaN included), ``[B, H, W]`` or ``[B, 1, H, W]``
            (broadcast over channels) or ``pred``'s full shape.
        reduction: ``"mean"`` - sum of squared errors over valid elements divided by their number
            (valid pixels x C when the mask is broadcast over channels), 0 when nothing is valid;
            ``"pixel_mean"`` - summed over channels, averaged over valid pixels: C x ``"mean"``;
            ``"sum"``; or ``"none"`` - the elementwise loss, 0 at padding.

    Padding never reaches the loss or the gradient, even if ``pred`` holds inf/NaN there (the
    difference is selected, not multiplied by the mask).

    The hand-written padded-image loss of JiT-style training, ``(diff * mask).sum() /
    (mask.sum() + 1e-8)`` with a ``[B, 1, H, W]`` mask, divides a sum over C x pixels by the
    *pixel* count: that is ``reduction="pixel_mean"`` (C times the per-element ``"mean"``, 3x for
    RGB, which also sets the effective learning rate). Switching from it to ``"mean"`` divides the
    loss and its gradients by C; ``"pixel_mean"`` keeps them.
    """
    _v.check_floating(pred, _NAME, "pred")
    _v.check_floating(target, _NAME, "target")
    _v.check_mask(mask, _NAME, "mask")
    if pred.shape != target.shape:
        raise ValueError(
            f"masked_mse_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if pred.dim() < 2:
        raise ValueError(f"masked_mse_loss: pred must be [B, C, ...], got shape {tuple(pred.shape)}")
    if not isinstance(reduction, str) or reduction not in ("mean", "pixel_mean", "sum", "none"):
        raise ValueError(f"masked_mse_loss: reduction must be 'mean', 'pixel_mean', 'sum' or 'none', got {reduction!r}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    if valid.dim() == pred.dim() - 1 and valid.shape[0] == pred.shape[0] and valid.shape[1:] == pred.shape[2:]:
        valid = valid.unsqueeze(1)
    ok = (
        valid.dim() == pred.dim()
        and valid.shape[0] == pred.shape[0]
        and valid.shape[1] in (1, pred.shape[1])
        and valid.shape[2:] == pred.shape[2:]
    )
    if not ok:
        raise ValueError(
            f"masked_mse_loss: mask must be [B, H, W], [B, 1, H, W] or pred's shape {tuple(pred.shape)}, "
            f"got shape {tuple(mask.shape)}"
        )
    if valid.device != pred.device:
        raise ValueError(f"masked_mse_loss: mask ({valid.device}) and pred ({pred.device}) must be on the same device")
    diff = torch.where(valid, pred - target, (pred - target).new_zeros(()))
    sq = diff * diff
    if reduction == "none":
        return sq
    total = sq.sum(dtype=torch.float32 if sq.dtype in (torch.float16, torch.bfloat16) else None)
    if reduction == "sum":
        return total.to(pred.dtype)
    channels = pred.shape[1] // valid.shape[1]
    count = valid.sum() * channels
    loss = total / count.clamp(min=1)
    if reduction == "pixel_mean":
        loss = loss * pred.shape[1]
    return loss.to(pred.dtype)
