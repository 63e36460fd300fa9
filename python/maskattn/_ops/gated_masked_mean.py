"""gated_masked_mean: sigmoid-gated global average pooling over valid pixels (wrapper, fakes, autograd)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as _v
from . import _autograd, _checks, _registration

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
    _v.reject_complex(mask, "gated_masked_mean", "mask")
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
    _checks.output_mask(output_mask)
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
    ctx.save_for_forward(features, output[1], mask)
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward(ctx, grad_pooled, grad_gate):
    features, gate, mask = ctx.saved_tensors
    gf, gl = _ops._gated_masked_mean_backward(grad_pooled, grad_gate, features, gate, mask, ctx.output_mask)
    return (gf if ctx.output_mask[0] else None), (gl if ctx.output_mask[1] else None), None


def _jvp(ctx, t_features, t_logits, _t_mask):
    # gate = valid * sigmoid(l): dgate = gate * (1 - gate) * dl (0 at padding, where gate is 0);
    # dpooled = sum_p (dgate f + gate df) / #valid. Padding content never reaches a tangent.
    features, gate, mask = ctx.saved_tensors
    acc = _autograd.acc_dtype(features.dtype)
    B, _, H, W = features.shape
    g = gate.reshape(B, 1, H, W).to(acc)
    if mask is None:
        valid = None
        count = torch.full((B, 1), H * W, dtype=acc, device=features.device)
    else:
        valid = (mask != 0).reshape(B, 1, H, W)
        count = valid.sum((2, 3)).to(acc)

    def keep(x):
        return x.to(acc) if valid is None else torch.where(valid, x.to(acc), 0)

    d_gate = torch.zeros_like(g)
    d_pooled = torch.zeros((B, features.shape[1]), dtype=acc, device=features.device)
    if t_logits is not None:
        d_gate = g * (1 - g) * keep(t_logits.reshape(B, 1, H, W))
        d_pooled = (d_gate * keep(features)).sum((2, 3))
    if t_features is not None:
        d_pooled = d_pooled + (g * keep(t_features)).sum((2, 3))
    d_pooled = torch.where(count > 0, d_pooled / count.clamp_min(1), 0)
    return d_pooled.to(features.dtype), d_gate.reshape(gate.shape).to(gate.dtype)


def _vmap(info, in_dims, features, gate_logits, mask):
    V = info.batch_size
    pooled, gate = _ops.gated_masked_mean(
        *(_autograd.fold(t, d, V) for t, d in zip((features, gate_logits, mask), in_dims))
    )
    return (_autograd.unfold(pooled, V), _autograd.unfold(gate, V)), (0, 0)


def _vmap_backward(info, in_dims, grad_pooled, grad_gate, features, gate, mask, output_mask):
    V = info.batch_size
    tensors = (grad_pooled, grad_gate, features, gate, mask)
    grads = _ops._gated_masked_mean_backward(*(_autograd.fold(t, d, V) for t, d in zip(tensors, in_dims)), output_mask)
    outs = tuple(_autograd.unfold(g, V) if m else g for g, m in zip(grads, output_mask))
    return outs, tuple(0 if m else None for m in output_mask)


_autograd.register("gated_masked_mean", setup_context=_setup, backward=_backward, jvp=_jvp, vmap=_vmap)
_autograd.register_backward("_gated_masked_mean_backward", vmap=_vmap_backward)
_registration.register_low_precision("gated_masked_mean")
