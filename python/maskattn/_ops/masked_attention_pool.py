"""masked_attention_pool and masked_attention_pool_packed: wrappers, fake kernels, autograd."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as _v
from .._segments import packed_offsets
from . import _autograd, _checks, _registration

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
    _v.reject_complex(mask, "masked_attention_pool", "mask")
    return _ops.masked_attention_pool(logits, features, mask)


def masked_attention_pool_packed(
    logits: Tensor,
    features: Tensor,
    offsets: Optional[Tensor] = None,
    *,
    batch: Optional[Tensor] = None,
    num_bags: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention pooling over bags stored back to back, with no padding at all.

    Args:
        logits: ``[T]`` or ``[T, K]``.
        features: ``[T, D]``.
        offsets: int64 ``[B+1]`` with ``0 = offsets[0] <= ... <= offsets[B] = T``; bag b is rows
            ``offsets[b]:offsets[b+1]``. On CPU bad offsets raise; on CUDA they are not checked (that
            would need a host sync) but are clamped so that nothing is read or written out of bounds.
        batch: keyword-only alternative to ``offsets``: PyG's bag id per row ``[T]``, sorted,
            converted by ``maskattn.offsets_from_batch(batch, num_bags)`` (checked on CPU; on CUDA
            unchecked, and ``num_bags=None`` costs one host sync). For unsorted ids use
            ``maskattn.sort_by_batch``.
        num_bags: with ``batch``: the number of bags (trailing empty bags included).

    Returns:
        ``(pooled [B, D] or [B, K, D], weights like logits)``; empty bags give zeros.
    """
    offsets = packed_offsets("masked_attention_pool_packed", offsets, batch, num_bags)
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
    _checks.output_mask(output_mask)
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
    ctx.save_for_forward(output[1], inputs[1])
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward_padded(ctx, grad_pooled, grad_weights):
    weights, features = ctx.saved_tensors
    gl, gf = _ops._masked_attention_pool_backward(grad_pooled, grad_weights, weights, features, ctx.output_mask)
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1], inputs[2])
    ctx.save_for_forward(output[1], inputs[1], inputs[2])
    ctx.output_mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _backward_packed(ctx, grad_pooled, grad_weights):
    weights, features, offsets = ctx.saved_tensors
    gl, gf = _ops._masked_attention_pool_packed_backward(
        grad_pooled, grad_weights, weights, features, offsets, ctx.output_mask
    )
    return (gl if ctx.output_mask[0] else None), (gf if ctx.output_mask[1] else None), None


# ---- forward mode: w = softmax over the bag's valid rows, pooled = sum_n w f ----
#   dw = w * (dl - sum_n w dl),   dpooled = sum_n (dw f + w df)
# Only rows of nonzero weight take part, so masked rows, -inf logits and empty bags give zero
# tangents, and padding content (even NaN) never reaches a tangent, as it never reaches pooled.


def _pool_tangents(weights, features, t_logits, t_features, row_sum, pool, k_squeezed):
    """Tangents of (pooled, weights). ``row_sum(x)``: ``x [rows, K]`` summed over each bag's rows
    and broadcast back to them; ``pool(w, f)``: ``sum_n w[n, k] f[n, :]`` per bag -> ``[B, K, D]``."""
    acc = _autograd.acc_dtype(features.dtype)
    w = (weights.unsqueeze(-1) if k_squeezed else weights).to(acc)  # [..., N, K]
    live = w != 0
    rows = live.any(-1, keepdim=True)
    d_weights = torch.zeros_like(w)
    d_pooled = pool(w, torch.zeros_like(features, dtype=acc))
    if t_logits is not None:
        tl = t_logits.unsqueeze(-1) if k_squeezed else t_logits
        wt = w * torch.where(live, tl.to(acc), 0)
        d_weights = wt - w * row_sum(wt)
        d_pooled = pool(d_weights, torch.where(rows, features.to(acc), 0))
    if t_features is not None:
        d_pooled = d_pooled + pool(w, torch.where(rows, t_features.to(acc), 0))
    if k_squeezed:
        d_pooled, d_weights = d_pooled.squeeze(-2), d_weights.squeeze(-1)
    return d_pooled.to(features.dtype), d_weights.to(weights.dtype)


def _jvp_padded(ctx, t_logits, t_features, _t_mask):
    weights, features = ctx.saved_tensors
    return _pool_tangents(
        weights,
        features,
        t_logits,
        t_features,
        lambda x: x.sum(1, keepdim=True),
        lambda w, f: torch.einsum("bnk,bnd->bkd", w, f),
        weights.dim() == 2,
    )


def _bag_index(offsets: Tensor, rows: int) -> Tensor:
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.arange(lengths.shape[0], device=offsets.device)
    return torch.repeat_interleave(bags, lengths, output_size=rows)


def _jvp_packed(ctx, t_logits, t_features, _t_offsets):
    weights, features, offsets = ctx.saved_tensors
    bag = _bag_index(offsets, features.shape[0])
    nbags = offsets.shape[0] - 1

    def bag_sum(x):  # x [T, ...] -> [B, ...]
        return x.new_zeros((nbags,) + tuple(x.shape[1:])).index_add(0, bag, x)

    return _pool_tangents(
        weights,
        features,
        t_logits,
        t_features,
        lambda x: bag_sum(x)[bag],
        lambda w, f: bag_sum(w.unsqueeze(-1) * f.unsqueeze(-2)),
        weights.dim() == 1,
    )


# ---- batching rules ----


def _vmap_padded(info, in_dims, logits, features, mask):
    ld, fd, md = in_dims
    V = info.batch_size
    if fd is None and md is None and logits.dim() in (3, 4):
        # Only the logits vary: the examples become V * K attention branches over the same features
        # (the K-branch layout), so the features are read once and never copied.
        x = logits.movedim(ld, 0)
        squeeze = x.dim() == 3
        x = x.unsqueeze(-1) if squeeze else x  # [V, B, N, K]
        _, B, N, K = x.shape
        pooled, weights = _ops.masked_attention_pool(x.permute(1, 2, 0, 3).reshape(B, N, V * K), features, mask)
        pooled = pooled.view(B, V, K, -1)
        weights = weights.view(B, N, V, K)
        if squeeze:
            return (pooled.squeeze(2), weights.squeeze(-1)), (1, 2)
        return (pooled, weights), (1, 2)
    pooled, weights = _ops.masked_attention_pool(
        _autograd.fold(logits, ld, V), _autograd.fold(features, fd, V), _autograd.fold(mask, md, V)
    )
    return (_autograd.unfold(pooled, V), _autograd.unfold(weights, V)), (0, 0)


def _vmap_packed(info, in_dims, logits, features, offsets):
    ld, fd, od = in_dims
    V = info.batch_size
    if fd is None and od is None and logits.dim() in (2, 3):
        # only the logits vary: V * K branches over the same rows (see _vmap_padded)
        x = logits.movedim(ld, 0)
        squeeze = x.dim() == 2
        x = x.unsqueeze(-1) if squeeze else x  # [V, T, K]
        _, T, K = x.shape
        pooled, weights = _ops.masked_attention_pool_packed(x.permute(1, 0, 2).reshape(T, V * K), features, offsets)
        pooled = pooled.view(pooled.shape[0], V, K, -1)
        weights = weights.view(T, V, K)
        if squeeze:
            return (pooled.squeeze(2), weights.squeeze(-1)), (1, 1)
        return (pooled, weights), (1, 1)
    f = _autograd.batched(features, fd, V)
    rows = f.shape[1]
    pooled, weights = _ops.masked_attention_pool_packed(
        _autograd.fold(logits, ld, V),
        f.reshape((V * rows,) + tuple(f.shape[2:])),
        _autograd.concat_offsets(offsets, od, rows, V, "masked_attention_pool_packed"),
    )
    return (_autograd.unfold(pooled, V), _autograd.unfold(weights, V)), (0, 0)


def _grad_outputs(grads, output_mask, V):
    """The backward ops' results, unfolded where computed (an empty tensor stands for 'not asked for')."""
    outs = tuple(_autograd.unfold(g, V) if m else g for g, m in zip(grads, output_mask))
    return outs, tuple(0 if m else None for m in output_mask)


def _vmap_backward_padded(info, in_dims, grad_pooled, grad_weights, weights, features, output_mask):
    V = info.batch_size
    grads = _ops._masked_attention_pool_backward(
        *(_autograd.fold(t, d, V) for t, d in zip((grad_pooled, grad_weights, weights, features), in_dims)),
        output_mask,
    )
    return _grad_outputs(grads, output_mask, V)


def _vmap_backward_packed(info, in_dims, grad_pooled, grad_weights, weights, features, offsets, output_mask):
    V = info.batch_size
    f = _autograd.batched(features, in_dims[3], V)
    rows = f.shape[1]
    grads = _ops._masked_attention_pool_packed_backward(
        _autograd.fold(grad_pooled, in_dims[0], V),
        _autograd.fold(grad_weights, in_dims[1], V),
        _autograd.fold(weights, in_dims[2], V),
        f.reshape((V * rows,) + tuple(f.shape[2:])),
        _autograd.concat_offsets(offsets, in_dims[4], rows, V, "masked_attention_pool_packed"),
        output_mask,
    )
    return _grad_outputs(grads, output_mask, V)


_autograd.register(
    "masked_attention_pool", setup_context=_setup_padded, backward=_backward_padded, jvp=_jvp_padded, vmap=_vmap_padded
)
_autograd.register(
    "masked_attention_pool_packed",
    setup_context=_setup_packed,
    backward=_backward_packed,
    jvp=_jvp_packed,
    vmap=_vmap_packed,
)
_autograd.register_backward("_masked_attention_pool_backward", vmap=_vmap_backward_padded)
_autograd.register_backward("_masked_attention_pool_packed_backward", vmap=_vmap_backward_packed)

# Under autocast the pooling runs in the autocast dtype; the kernels accumulate in float32.
_registration.register_low_precision("masked_attention_pool")
_registration.register_low_precision("masked_attention_pool_packed")
