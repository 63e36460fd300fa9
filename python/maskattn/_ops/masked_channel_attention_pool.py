"""masked_channel_attention_pool and masked_channel_attention_pool_packed: wrappers, fake kernels,
autograd (reverse, forward mode, vmap) and autocast.

PyG's feature-level gate (``AttentionalAggregation`` with a ``gate_nn`` that outputs one logit per
channel): every channel of a bag has a softmax of its own over the bag's rows.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as _v
from .._segments import packed_offsets
from . import _autograd, _checks, _registration

_ops = torch.ops.maskattn
_PADDED = "masked_channel_attention_pool"
_PACKED = "masked_channel_attention_pool_packed"


def masked_channel_attention_pool(
    logits: Tensor, features: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Channel-wise softmax pooling of each bag's valid rows (PyG's feature-level gate).

    ``weights[b, n, d] = softmax over the valid rows n of logits[b, n, d]`` and
    ``pooled[b, d] = sum_n weights[b, n, d] * features[b, n, d]``: one softmax per bag and channel.

    Args:
        logits: ``[B, N, D]``, one gate logit per row and channel.
        features: ``[B, N, D]``, any strides (channels-first views are read in place).
        mask: ``[B, N]`` valid mask of any dtype (nonzero = take part), or None for all valid.

    Returns:
        ``(pooled [B, D], weights [B, N, D])``; weights are exactly 0 at padding. A channel with no
        valid row (or only ``-inf`` logits) gets zero weights and a zero pooled value, never NaN.
        Half types accumulate in float32.
    """
    _v.reject_complex(mask, _PADDED, "mask")
    return _ops.masked_channel_attention_pool(logits, features, mask)


def masked_channel_attention_pool_packed(
    logits: Tensor,
    features: Tensor,
    offsets: Optional[Tensor] = None,
    *,
    batch: Optional[Tensor] = None,
    num_bags: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Channel-wise softmax pooling over bags stored back to back (PyG's layout), no padding.

    Args:
        logits: ``[T, D]``, one gate logit per row and channel (``gate_nn(x)``).
        features: ``[T, D]`` (``x``, or ``nn(x)``).
        offsets: int64 ``[B+1]`` with ``0 = offsets[0] <= ... <= offsets[B] = T``; bag b is rows
            ``offsets[b]:offsets[b+1]``. On CPU bad offsets raise; on CUDA they are not checked (that
            would need a host sync) but are clamped so that nothing is read or written out of bounds.
        batch: keyword-only alternative to ``offsets``: PyG's bag (graph) id per row ``[T]``,
            sorted, converted by ``maskattn.offsets_from_batch(batch, num_bags)``.
        num_bags: with ``batch``: the number of bags (trailing empty bags included).

    Returns:
        ``(pooled [B, D], weights [T, D])``; empty bags give zeros.
    """
    offsets = packed_offsets(_PACKED, offsets, batch, num_bags)
    return _ops.masked_channel_attention_pool_packed(logits, features, offsets)


# ---- fake kernels: shapes, dtypes and strides exactly as the real kernels return them ----


def _check_fake(op, logits, features, rows_dims):
    shape = "[B, N, D]" if rows_dims == 3 else "[T, D]"
    torch._check(features.dim() == rows_dims, lambda: f"{op}: features must be {shape}, got {tuple(features.shape)}")
    torch._check(logits.dim() == rows_dims, lambda: f"{op}: logits must be {shape}, got {tuple(logits.shape)}")
    torch._check(logits.dtype == features.dtype, lambda: f"{op}: logits and features must have the same dtype")
    for i in range(rows_dims):
        torch._check(
            logits.shape[i] == features.shape[i],
            lambda: f"{op}: logits {tuple(logits.shape)} and features {tuple(features.shape)} must have the same shape",
        )


@torch.library.register_fake("maskattn::masked_channel_attention_pool")
def _(logits, features, mask=None):
    _checks.same_device(logits, f"{_PADDED}: logits", features, "features")
    _checks.same_device(mask, f"{_PADDED}: mask", features, "features")
    _check_fake(_PADDED, logits, features, 3)
    return features.new_empty((features.shape[0], features.shape[2])), logits.new_empty(logits.shape)


@torch.library.register_fake("maskattn::masked_channel_attention_pool_packed")
def _(logits, features, offsets):
    _checks.same_device(logits, f"{_PACKED}: logits", features, "features")
    _checks.same_device(offsets, f"{_PACKED}: offsets", features, "features")
    _check_fake(_PACKED, logits, features, 2)
    torch._check(offsets.dim() == 1, lambda: f"{_PACKED}: offsets must be 1-D [B+1]")
    return features.new_empty((offsets.shape[0] - 1, features.shape[1])), logits.new_empty(logits.shape)


def _backward_fake(op, grad_pooled, grad_weights, pooled, weights, features, output_mask, offsets=None):
    _checks.output_mask(output_mask)
    _checks.same_device(weights, f"{op}: weights", features, "features")
    _checks.same_device(pooled, f"{op}: pooled", features, "features")
    _checks.same_device(grad_pooled, f"{op}: grad_pooled", features, "features")
    _checks.same_device(grad_weights, f"{op}: grad_weights", features, "features")
    _checks.same_device(offsets, f"{op}: offsets", features, "features")
    gl = weights.new_empty(weights.shape) if output_mask[0] else weights.new_empty((0,))
    gf = features.new_empty(features.shape) if output_mask[1] else features.new_empty((0,))
    return gl, gf


@torch.library.register_fake("maskattn::_masked_channel_attention_pool_backward")
def _(grad_pooled, grad_weights, pooled, weights, features, output_mask):
    return _backward_fake(
        "_masked_channel_attention_pool_backward", grad_pooled, grad_weights, pooled, weights, features, output_mask
    )


@torch.library.register_fake("maskattn::_masked_channel_attention_pool_packed_backward")
def _(grad_pooled, grad_weights, pooled, weights, features, offsets, output_mask):
    return _backward_fake(
        "_masked_channel_attention_pool_packed_backward",
        grad_pooled,
        grad_weights,
        pooled,
        weights,
        features,
        output_mask,
        offsets,
    )


# ---- autograd: the weights (an output), the features (an input) and a copy of pooled are saved ----
# The backward needs sum_n w f, which is pooled: reading it makes the backward one pass over the
# weights and features instead of two. A copy ([B, D], small beside the [rows, D] tensors) is saved
# rather than the output itself, so that pooled stays free for in-place updates (pooled += bias) as
# the other ops' outputs are.


# An output the loss does not use gets no gradient (None), not a materialised zeros tensor: for the
# weights that would be a [rows, D] tensor allocated and zeroed, and a second pass over the weights
# in the backward to sum it (grad_weights is then None, the common case when only pooled is used).


def _setup(ctx, output, *saved):
    ctx.save_for_backward(output[0].detach().clone(), output[1], *saved)
    ctx.save_for_forward(output[1], *saved)
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    ctx.set_materialize_grads(False)


def _setup_padded(ctx, inputs, output):
    _setup(ctx, output, inputs[1])


def _backward_padded(ctx, grad_pooled, grad_weights):
    pooled, weights, features = ctx.saved_tensors
    gl, gf = _ops._masked_channel_attention_pool_backward(
        torch.zeros_like(pooled) if grad_pooled is None else grad_pooled,
        grad_weights,
        pooled,
        weights,
        features,
        ctx.output_mask,
    )
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


def _setup_packed(ctx, inputs, output):
    _setup(ctx, output, inputs[1], inputs[2])


def _backward_packed(ctx, grad_pooled, grad_weights):
    pooled, weights, features, offsets = ctx.saved_tensors
    gl, gf = _ops._masked_channel_attention_pool_packed_backward(
        torch.zeros_like(pooled) if grad_pooled is None else grad_pooled,
        grad_weights,
        pooled,
        weights,
        features,
        offsets,
        ctx.output_mask,
    )
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


# ---- forward mode: w = softmax over the bag's valid rows, per channel; pooled = sum_n w f ----
#   dw = w * (dl - sum_n w dl),   dpooled = sum_n (dw f + w df)
# Only entries of nonzero weight take part, so masked rows, -inf logits and empty bags give zero
# tangents, and padding content (even NaN) never reaches a tangent, as it never reaches pooled.


def _channel_tangents(weights, features, t_logits, t_features, bag_sum, per_row):
    """Tangents of (pooled, weights). ``bag_sum(x)``: ``x`` (rows, D) summed over each bag's rows ->
    ``[B, D]``; ``per_row(y)``: ``y [B, D]`` broadcast back to the rows."""
    acc = _autograd.acc_dtype(features.dtype)
    w = weights.to(acc)
    live = w != 0
    zero = w.new_zeros(())
    d_weights = torch.zeros_like(w)
    d_pooled = bag_sum(d_weights)
    if t_logits is not None:
        wt = w * torch.where(live, t_logits.to(acc), zero)
        d_weights = torch.where(live, wt - w * per_row(bag_sum(wt)), zero)
        d_pooled = bag_sum(d_weights * torch.where(live, features.to(acc), zero))
    if t_features is not None:
        d_pooled = d_pooled + bag_sum(w * torch.where(live, t_features.to(acc), zero))
    return d_pooled.to(features.dtype), d_weights.to(weights.dtype)


def _jvp_padded(ctx, t_logits, t_features, _t_mask):
    weights, features = ctx.saved_tensors
    return _channel_tangents(weights, features, t_logits, t_features, lambda x: x.sum(1), lambda y: y.unsqueeze(1))


def _bag_index(offsets: Tensor, rows: int) -> Tensor:
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.arange(lengths.shape[0], device=offsets.device)
    return torch.repeat_interleave(bags, lengths, output_size=rows)


def _jvp_packed(ctx, t_logits, t_features, _t_offsets):
    weights, features, offsets = ctx.saved_tensors
    bag = _bag_index(offsets, features.shape[0])
    nbags = offsets.shape[0] - 1

    def bag_sum(x):
        return x.new_zeros((nbags,) + tuple(x.shape[1:])).index_add(0, bag, x)

    return _channel_tangents(weights, features, t_logits, t_features, bag_sum, lambda y: y[bag])


# ---- batching rules: the vmapped examples become more bags ----


def _vmap_padded(info, in_dims, logits, features, mask):
    ld, fd, md = in_dims
    V = info.batch_size
    pooled, weights = _ops.masked_channel_attention_pool(
        _autograd.fold(logits, ld, V), _autograd.fold(features, fd, V), _autograd.fold(mask, md, V)
    )
    return (_autograd.unfold(pooled, V), _autograd.unfold(weights, V)), (0, 0)


def _vmap_packed(info, in_dims, logits, features, offsets):
    ld, fd, od = in_dims
    V = info.batch_size
    f = _autograd.batched(features, fd, V)
    rows = f.shape[1]
    pooled, weights = _ops.masked_channel_attention_pool_packed(
        _autograd.fold(logits, ld, V),
        f.reshape((V * rows,) + tuple(f.shape[2:])),
        _autograd.concat_offsets(offsets, od, rows, V, _PACKED),
    )
    return (_autograd.unfold(pooled, V), _autograd.unfold(weights, V)), (0, 0)


def _grad_outputs(grads, output_mask, V):
    """The backward ops' results, unfolded where computed (an empty tensor stands for 'not asked for')."""
    outs = tuple(_autograd.unfold(g, V) if m else g for g, m in zip(grads, output_mask))
    return outs, tuple(0 if m else None for m in output_mask)


def _vmap_backward_padded(info, in_dims, grad_pooled, grad_weights, pooled, weights, features, output_mask):
    V = info.batch_size
    grads = _ops._masked_channel_attention_pool_backward(
        *(_autograd.fold(t, d, V) for t, d in zip((grad_pooled, grad_weights, pooled, weights, features), in_dims)),
        output_mask,
    )
    return _grad_outputs(grads, output_mask, V)


def _vmap_backward_packed(info, in_dims, grad_pooled, grad_weights, pooled, weights, features, offsets, output_mask):
    V = info.batch_size
    f = _autograd.batched(features, in_dims[4], V)
    rows = f.shape[1]
    grads = _ops._masked_channel_attention_pool_packed_backward(
        _autograd.fold(grad_pooled, in_dims[0], V),
        _autograd.fold(grad_weights, in_dims[1], V),
        _autograd.fold(pooled, in_dims[2], V),
        _autograd.fold(weights, in_dims[3], V),
        f.reshape((V * rows,) + tuple(f.shape[2:])),
        _autograd.concat_offsets(offsets, in_dims[5], rows, V, _PACKED),
        output_mask,
    )
    return _grad_outputs(grads, output_mask, V)


_autograd.register(_PADDED, setup_context=_setup_padded, backward=_backward_padded, jvp=_jvp_padded, vmap=_vmap_padded)
_autograd.register(_PACKED, setup_context=_setup_packed, backward=_backward_packed, jvp=_jvp_packed, vmap=_vmap_packed)
_autograd.register_backward("_masked_channel_attention_pool_backward", vmap=_vmap_backward_padded)
_autograd.register_backward("_masked_channel_attention_pool_packed_backward", vmap=_vmap_backward_packed)

# Under autocast the pooling runs in the autocast dtype; the kernels accumulate in float32.
_registration.register_low_precision(_PADDED)
_registration.register_low_precision(_PACKED)
