"""gated_masked_mean: sigmoid-gated global average pooling over valid pixels (wrapper, fakes, autograd)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks

_ops = torch.ops.maskattn


def gated_masked_mean(features: Tensor, gate_logits: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``pooled[b,c] = sum_p gate[b,p] * features[b,c,p] / #valid(b)`` with ``gate = mask * sigmoid(gate_logits)``.

    The fused form of ``(features * torch.sigmoid(gate_logits)).mean((2, 3))``: ``gate * features``
    is never materialised, forward or backward.

    Args:
        features: ``[B, C, H, W]``, any strides (channels-last is read in place).
        gate_logits: ``[B, 1, H, W]`` or ``[B, H, W]``, pre-sigmoid scores, same dtype as features.
        mask: ``[B, H, W]`` valid mask of any dtype (nonzero = take part), or None for all valid.

    Returns:
        ``(pooled [B, C], gate)``: gate shaped like gate_logits, the sigmoid at valid pixels and
        exactly 0 at padding. A sample without valid pixels pools to zeros with zero gradient.
    """
    return _ops.gated_masked_mean(features, gate_logits, mask)


@torch.library.register_fake("maskattn::gated_masked_mean")
def _(features, gate_logits, mask=None):
    _checks.same_device(gate_logits, "gated_masked_mean: gate_logits", features, "features")
    _checks.same_device(mask, "gated_masked_mean: mask", features, "features")
    torch._check(
        features.dim() == 4, lambda: f"gated_masked_mean: features must be [B, C, H, W], got {tuple(features.shape)}"
    )
    torch._check(
        gate_logits.dtype == features.dtype,
        lambda: "gated_masked_mean: gate_logits and features must have the same dtype",
    )
    pooled = features.new_empty((features.shape[0], features.shape[1]))
    gate = gate_logits.new_empty(gate_logits.shape)
    return pooled, gate


@torch.library.register_fake("maskattn::_gated_masked_mean_backward")
def _(grad_pooled, grad_gate, features, gate, mask, output_mask):
    op = "_gated_masked_mean_backward"
    for t, n in (("grad_pooled", grad_pooled), ("grad_gate", grad_gate), ("gate", gate), ("mask", mask)):
        _checks.same_device(n, f"{op}: {t}", features, "features")
    torch._check(features.dim() == 4, lambda: f"{op}: features must be [B, C, H, W], got shape {list(features.shape)}")
    _checks.floating(op, features, "features")
    B, C, H, W = features.shape
    _checks.shape(op, grad_pooled, "grad_pooled", (B, C))
    torch._check(
        gate.dim() in (3, 4) and tuple(gate.shape) in ((B, H, W), (B, 1, H, W)),
        lambda: (
            f"{op}: gate must be [B, 1, H, W] or [B, H, W] matching features {list(features.shape)}, "
            f"got shape {list(gate.shape)}"
        ),
    )
    _checks.same_dtype(op, grad_pooled, "grad_pooled", features, "features")
    _checks.same_dtype(op, gate, "gate", features, "features")
    if grad_gate is not None:
        _checks.shape(op, grad_gate, "grad_gate", gate.shape)
        _checks.same_dtype(op, grad_gate, "grad_gate", gate, "gate")
    if mask is not None:
        _checks.shape(op, mask, "mask", (B, H, W))
        _checks.mask_dtype(op, mask, "mask")
    gf = features.new_empty(features.shape) if output_mask[0] else features.new_empty((0,))
    gl = gate.new_empty(gate.shape) if output_mask[1] else gate.new_empty((0,))
    return gf, gl


def _setup(ctx, inputs, output):
    features, _, mask = inputs
    ctx.save_for_backward(features, output[1], mask)
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward(ctx, grad_pooled, grad_gate):
    features, gate, mask = ctx.saved_tensors
    gf, gl = _ops._gated_masked_mean_backward(grad_pooled, grad_gate, features, gate, mask, ctx.output_mask)
    return (gf if ctx.output_mask[0] else None), (gl if ctx.output_mask[1] else None), None


torch.library.register_autograd("maskattn::gated_masked_mean", _backward, setup_context=_setup)

from . import _registration  # noqa: E402

_registration.register_low_precision("gated_masked_mean")
_registration.forbid_double_backward("_gated_masked_mean_backward")
