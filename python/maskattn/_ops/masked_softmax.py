"""masked_softmax: softmax over the valid positions of a broadcastable mask; wrapper, fake, autograd."""

import math

import torch
from torch import Tensor

from .. import _validation as _v
from . import _autograd, _checks, _registration

_ops = torch.ops.maskattn


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1, scale: float = 1.0) -> Tensor:
    """``softmax(scale * scores)`` over ``dim`` among the positions where ``mask`` is valid.

    Args:
        scores: any shape, float32/float64/float16/bfloat16, any strides.
        mask: valid mask (nonzero = take part) of any dtype, broadcastable to ``scores`` - e.g. a
            ``[B, 1, 1, N]`` key mask for ``[B, H, N, N]`` scores, ``[B, 1, N, N]`` for a per-pair
            mask, ``[N, N]`` for a causal one. It is read through its strides, never expanded.
        dim: the softmax dim.
        scale: multiplies the scores before the softmax (fused: no scaled copy of the scores).

    Returns:
        probabilities shaped like ``scores`` (contiguous, scores' dtype): exactly 0 at masked
        positions, and all 0 (not NaN, not uniform) in a slice with no valid position; the gradient
        there is 0 too. Half types accumulate in float32.

    This replaces ``scores.masked_fill(mask == 0, float('-inf')).softmax(dim)`` (NaN on fully
    masked rows) and the ``-1e9`` fill (uniform weights over padding on fully masked rows) with one
    read of the scores and one write of the result.
    """
    _v.reject_complex(mask, "masked_softmax", "mask")
    return _ops.masked_softmax(scores, mask, dim, scale)


def _wrap(dim: int, nd: int) -> int:
    torch._check(nd >= 1 and -nd <= dim < nd, lambda: f"masked_softmax: dim = {dim} is out of range for {nd}-d scores")
    return dim % nd


@torch.library.register_fake("maskattn::masked_softmax")
def _(scores, mask, dim=-1, scale=1.0):
    _checks.same_device(scores, "masked_softmax: scores", mask, "mask")
    _wrap(dim, scores.dim())
    torch._check(
        scores.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        lambda: f"masked_softmax: scores must be float32, float64, float16 or bfloat16, got {scores.dtype}",
    )
    torch._check(
        mask.dim() <= scores.dim(),
        lambda: (
            f"masked_softmax: mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(scores.shape)}"
        ),
    )
    for i in range(1, mask.dim() + 1):
        torch._check(
            mask.shape[-i] == 1 or mask.shape[-i] == scores.shape[-i],
            lambda: (
                f"masked_softmax: mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(scores.shape)}"
            ),
        )
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


@torch.library.register_fake("maskattn::_masked_softmax_backward")
def _(grad_output, output, dim, scale):
    op = "_masked_softmax_backward"
    _checks.same_device(grad_output, f"{op}: grad_output", output, "output")
    torch._check(
        grad_output.shape == output.shape,
        lambda: f"{op}: grad_output {list(grad_output.shape)} must have the shape of output {list(output.shape)}",
    )
    _checks.same_dtype(op, grad_output, "grad_output", output, "output")
    _checks.floating(op, output, "output")
    torch._check(
        output.dim() >= 1 and -output.dim() <= dim < output.dim(),
        lambda: f"{op}: dim = {dim} is out of range for output of shape {list(output.shape)}",
    )
    torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")
    return torch.empty(output.shape, dtype=output.dtype, device=output.device)


# ---- autograd, forward mode, batching rules ----


# Only the output is saved: the softmax backward and jvp need y alone (y is 0 wherever the mask is not).
def _setup(ctx, inputs, output):
    _, _, dim, scale = inputs
    ctx.dim, ctx.scale = dim, scale
    ctx.save_for_backward(output)
    ctx.save_for_forward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    g = _ops._masked_softmax_backward(grad, y, ctx.dim, ctx.scale) if ctx.needs_input_grad[0] else None
    return g, None, None, None


def _jvp(ctx, t_scores, *_):
    # dy = scale * y * (dx - <y, dx>): the softmax Jacobian is symmetric. Tangents at positions of
    # weight 0 (masked, -inf, fully masked slices) are dropped, so they cannot leak inf or NaN.
    (y,) = ctx.saved_tensors
    if t_scores is None:
        return torch.zeros_like(y)
    acc = _autograd.acc_dtype(y.dtype)
    yy = y.to(acc)
    yt = yy * torch.where(y != 0, t_scores.to(acc), 0)
    return (ctx.scale * (yt - yy * yt.sum(ctx.dim, keepdim=True))).to(y.dtype)


def _vmap(info, in_dims, scores, mask, dim, scale):
    sd, md = in_dims[0], in_dims[1]
    V = info.batch_size
    nd = scores.dim() - (sd is not None)
    d = _wrap(dim, nd)
    if md is not None:
        # a per-example mask: its own dims stay right-aligned with the scores' logical dims
        mask = mask.movedim(md, 0)
        torch._check(
            mask.dim() - 1 <= nd,
            lambda: f"masked_softmax: mask of shape {tuple(mask.shape[1:])} does not broadcast to scores of {nd} dims",
        )
        mask = mask.reshape((V,) + (1,) * (nd - mask.dim() + 1) + tuple(mask.shape[1:]))
    else:
        torch._check(
            mask.dim() <= nd,
            lambda: f"masked_softmax: mask of shape {tuple(mask.shape)} does not broadcast to scores of {nd} dims",
        )
    return _ops.masked_softmax(_autograd.batched(scores, sd, V), mask, d + 1, scale), 0


def _backward_vmap(info, in_dims, grad_output, output, dim, scale):
    V = info.batch_size
    d = _wrap(dim, output.dim() - (in_dims[1] is not None))
    g = _autograd.batched(grad_output, in_dims[0], V)
    y = _autograd.batched(output, in_dims[1], V)
    return _ops._masked_softmax_backward(g, y, d + 1, scale), 0


_autograd.register("masked_softmax", setup_context=_setup, backward=_backward, jvp=_jvp, vmap=_vmap)
_autograd.register_backward("_masked_softmax_backward", vmap=_backward_vmap)
# Under autocast the softmax runs in the autocast dtype (float32 accumulation); the mask keeps its dtype.
_registration.register_low_precision("masked_softmax", keep=("mask",))
