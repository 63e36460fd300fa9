"""masked_attention_pool and masked_attention_pool_packed: wrappers, fake kernels, autograd."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks, _registration

_ops = torch.ops.maskattn


def masked_attention_pool(logits: Tensor, features: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Softmax-weighted pooling of each bag's valid rows.

    Args:
        logits: ``[B, N]`` attention scores, or ``[B, N, K]`` for K attention branches.
        features: ``[B, N, D]``, any strides (channels-first views are read in place).
        mask: ``[B, N]`` valid mask of any dtype (nonzero = take part), or None for all valid.

    Returns:
        ``(pooled, weights)``: pooled ``[B, D]`` (or ``[B, K, D]``) and weights shaped like logits,
        exactly 0 at padding. A bag with no valid row (or only ``-inf`` logits) gets zero weights
        and a zero pooled vector, never NaN. Half types accumulate in float32.
    """
    return _ops.masked_attention_pool(logits, features, mask)


def masked_attention_pool_packed(logits: Tensor, features: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """Attention pooling over bags stored back to back, with no padding at all.

    Args:
        logits: ``[T]`` or ``[T, K]``.
        features: ``[T, D]``.
        offsets: int64 ``[B+1]`` with ``0 = offsets[0] <= ... <= offsets[B] = T``; bag b is rows
            ``offsets[b]:offsets[b+1]``. On CPU bad offsets raise; on CUDA they are not checked (that
            would need a host sync) but are clamped so that nothing is read or written out of bounds.

    Returns:
        ``(pooled [B, D] or [B, K, D], weights like logits)``; empty bags give zeros.
    """
    return _ops.masked_attention_pool_packed(logits, features, offsets)


# ---- fake kernels: shapes, dtypes and strides exactly as the real kernels return them ----


def _pooled_shape(logits: Tensor, features: Tensor, batch: int, has_k: bool):
    if has_k:
        return (batch, logits.shape[-1], features.shape[-1])
    return (batch, features.shape[-1])


@torch.library.register_fake("maskattn::masked_attention_pool")
def _(logits, features, mask=None):
    _checks.same_device(logits, "masked_attention_pool: logits", features, "features")
    _checks.same_device(mask, "masked_attention_pool: mask", features, "features")
    torch._check(
        features.dim() == 3, lambda: f"masked_attention_pool: features must be [B, N, D], got {tuple(features.shape)}"
    )
    torch._check(
        logits.dim() in (2, 3),
        lambda: f"masked_attention_pool: logits must be [B, N] or [B, N, K], got {tuple(logits.shape)}",
    )
    torch._check(
        logits.dtype == features.dtype, lambda: "masked_attention_pool: logits and features must have the same dtype"
    )
    pooled = features.new_empty(_pooled_shape(logits, features, features.shape[0], logits.dim() == 3))
    weights = logits.new_empty(logits.shape)
    return pooled, weights


@torch.library.register_fake("maskattn::masked_attention_pool_packed")
def _(logits, features, offsets):
    _checks.same_device(logits, "masked_attention_pool_packed: logits", features, "features")
    _checks.same_device(offsets, "masked_attention_pool_packed: offsets", features, "features")
    torch._check(
        features.dim() == 2,
        lambda: f"masked_attention_pool_packed: features must be [T, D], got {tuple(features.shape)}",
    )
    torch._check(
        logits.dim() in (1, 2),
        lambda: f"masked_attention_pool_packed: logits must be [T] or [T, K], got {tuple(logits.shape)}",
    )
    torch._check(
        logits.dtype == features.dtype,
        lambda: "masked_attention_pool_packed: logits and features must have the same dtype",
    )
    _checks.offsets("masked_attention_pool_packed", offsets, features)
    batch = offsets.shape[0] - 1
    pooled = features.new_empty(_pooled_shape(logits, features, batch, logits.dim() == 2))
    weights = logits.new_empty(logits.shape)
    return pooled, weights


def _backward_fake(op, grad_pooled, grad_weights, weights, features, offsets, output_mask):
    # the checks of check_pool_grads (csrc/masked_attention_pool.cpp), in its order where it matters
    packed = offsets is not None
    for t, n in (("grad_pooled", grad_pooled), ("grad_weights", grad_weights), ("weights", weights)):
        _checks.same_device(n, f"{op}: {t}", features, "features")
    fdim = 2 if packed else 3
    torch._check(
        features.dim() == fdim,
        lambda: f"{op}: features must be {'[T, D]' if packed else '[B, N, D]'}, got shape {list(features.shape)}",
    )
    torch._check(
        weights.dim() in (fdim - 1, fdim),
        lambda: (
            f"{op}: weights must be {'[T] or [T, K]' if packed else '[B, N] or [B, N, K]'}, got {list(weights.shape)}"
        ),
    )
    _checks.floating(op, features, "features")
    _checks.same_dtype(op, weights, "weights", features, "features")
    _checks.same_dtype(op, grad_pooled, "grad_pooled", features, "features")
    torch._check(
        tuple(weights.shape[: fdim - 1]) == tuple(features.shape[: fdim - 1]),
        lambda: f"{op}: weights {list(weights.shape)} does not match features {list(features.shape)}",
    )
    if packed:
        _checks.offsets(op, offsets, features)
        batch = offsets.shape[0] - 1
    else:
        batch = features.shape[0]
    has_k = weights.dim() == fdim
    _checks.shape(op, grad_pooled, "grad_pooled", _pooled_shape(weights, features, batch, has_k))
    if grad_weights is not None:
        _checks.shape(op, grad_weights, "grad_weights", weights.shape)
        _checks.same_dtype(op, grad_weights, "grad_weights", weights, "weights")
    # both kernels return contiguous gradients
    gl = weights.new_empty(weights.shape) if output_mask[0] else weights.new_empty((0,))
    gf = features.new_empty(features.shape) if output_mask[1] else features.new_empty((0,))
    return gl, gf


@torch.library.register_fake("maskattn::_masked_attention_pool_backward")
def _(grad_pooled, grad_weights, weights, features, output_mask):
    return _backward_fake(
        "_masked_attention_pool_backward", grad_pooled, grad_weights, weights, features, None, output_mask
    )


@torch.library.register_fake("maskattn::_masked_attention_pool_packed_backward")
def _(grad_pooled, grad_weights, weights, features, offsets, output_mask):
    return _backward_fake(
        "_masked_attention_pool_packed_backward", grad_pooled, grad_weights, weights, features, offsets, output_mask
    )


# ---- autograd: only the weights (an output) and the features (an input) are saved ----


def _setup_padded(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1])
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward_padded(ctx, grad_pooled, grad_weights):
    weights, features = ctx.saved_tensors
    gl, gf = _ops._masked_attention_pool_backward(grad_pooled, grad_weights, weights, features, ctx.output_mask)
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1], inputs[2])
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward_packed(ctx, grad_pooled, grad_weights):
    weights, features, offsets = ctx.saved_tensors
    gl, gf = _ops._masked_attention_pool_packed_backward(
        grad_pooled, grad_weights, weights, features, offsets, ctx.output_mask
    )
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


torch.library.register_autograd("maskattn::masked_attention_pool", _backward_padded, setup_context=_setup_padded)
torch.library.register_autograd("maskattn::masked_attention_pool_packed", _backward_packed, setup_context=_setup_packed)

# Under autocast the pooling runs in the autocast dtype; the kernels accumulate in float32.
_registration.register_low_precision("masked_attention_pool")
_registration.register_low_precision("masked_attention_pool_packed")
_registration.forbid_double_backward("_masked_attention_pool_backward")
_registration.forbid_double_backward("_masked_attention_pool_packed_backward")
