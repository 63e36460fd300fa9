"""scaled_cross_attention: wrapper, fake kernels, autograd."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks

_ops = torch.ops.maskattn


def scaled_cross_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    logit_scale_log: Tensor,
    max_scale: float = 100.0,
    key_mask: Optional[Tensor] = None,
    normalize: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Cross-attention with a learnable, clamped logit scale, fused.

    ``scale = min(exp(logit_scale_log), max_scale)``; ``logits = scale * <q, k>`` (with ``q`` and
    ``k`` L2-normalised first when ``normalize``: cosine logits); ``attn`` = softmax over the valid
    keys (row-max subtracted, so any scale is safe); ``out = attn @ value``.

    Args:
        query: ``[B, Lq, D]``, or ``[B, D]`` for one query per sample.
        key: ``[B, Lk, D]``, or ``[Lk, D]``: prototypes shared by the whole batch.
        value: ``[B, Lk, Dv]`` or ``[Lk, Dv]`` (pass ``key`` itself to pool the prototypes).
        logit_scale_log: 0-dim tensor (a parameter); its dtype may differ from the inputs'.
        max_scale: the cap (CLIP's 100). ``math.inf`` disables it (the open_clip recipe, which
            clamps the parameter after each optimizer step instead).
        key_mask: ``[B, Lk]`` or ``[Lk]`` valid mask of any dtype (nonzero = key takes part).
        normalize: L2-normalise query and key rows (``F.normalize``, eps 1e-12).

    Returns:
        ``(out, attn)``: ``out`` ``[B, Lq, Dv]`` (``[B, Dv]`` for 2-D query) and ``attn``
        ``[B, Lq, Lk]`` (``[B, Lk]``). Masked keys get weight exactly 0; a query with no valid key
        gets zero weights and a zero output. Gradients reach query, key, value and
        ``logit_scale_log``; the latter's is zero while ``exp(logit_scale_log) > max_scale``,
        exactly as ``torch.clamp`` gives.
    """
    return _ops.scaled_cross_attention(query, key, value, logit_scale_log, float(max_scale), key_mask, normalize)


# ---- fake kernels: shapes, dtypes and strides exactly as the real kernels return them ----


def _forward_shapes(op, query, key, value, logit_scale_log, max_scale, key_mask):
    """check_xattn_inputs (csrc/scaled_cross_attention.cpp) on fakes: (out shape, attn shape)."""
    for t, n in ((key, "key"), (value, "value"), (logit_scale_log, "logit_scale_log"), (key_mask, "key_mask")):
        _checks.same_device(t, f"{op}: {n}", query, "query")
    torch._check(query.dim() in (2, 3), lambda: f"{op}: query must be [B, Lq, D] or [B, D], got {list(query.shape)}")
    torch._check(key.dim() in (2, 3), lambda: f"{op}: key must be [B, Lk, D] or [Lk, D], got {list(key.shape)}")
    torch._check(value.dim() in (2, 3), lambda: f"{op}: value must be [B, Lk, Dv] or [Lk, Dv], got {list(value.shape)}")
    _checks.floating(op, query, "query")
    torch._check(
        key.dtype == query.dtype and value.dtype == query.dtype,
        lambda: f"{op}: query ({query.dtype}), key ({key.dtype}) and value ({value.dtype}) must have the same dtype",
    )
    torch._check(
        logit_scale_log.dim() == 0,
        lambda: f"{op}: logit_scale_log must be a 0-dim tensor, got shape {list(logit_scale_log.shape)}",
    )
    _checks.floating(op, logit_scale_log, "logit_scale_log")
    torch._check(
        not math.isnan(max_scale) and max_scale > 0, lambda: f"{op}: max_scale must be positive, got {max_scale}"
    )
    B, D = query.shape[0], query.shape[-1]
    Lk, Dv = key.shape[-2], value.shape[-1]
    torch._check(key.shape[-1] == D, lambda: f"{op}: key and query must have the same feature size D")
    torch._check(key.dim() == 2 or key.shape[0] == B, lambda: f"{op}: key must have batch size B = {B} of query")
    torch._check(value.shape[-2] == Lk, lambda: f"{op}: value must have Lk = {Lk} rows, one per key")
    torch._check(value.dim() == 2 or value.shape[0] == B, lambda: f"{op}: value must have batch size B = {B} of query")
    if key_mask is not None:
        _checks.mask_dtype(op, key_mask, "key_mask")
        torch._check(
            tuple(key_mask.shape) in ((Lk,), (B, Lk)),
            lambda: f"{op}: key_mask must be [B, Lk] = [{B}, {Lk}] or [Lk] = [{Lk}], got shape {list(key_mask.shape)}",
        )
    if query.dim() == 2:
        return (B, Dv), (B, Lk)
    Lq = query.shape[1]
    return (B, Lq, Dv), (B, Lq, Lk)


@torch.library.register_fake("maskattn::scaled_cross_attention")
def _(query, key, value, logit_scale_log, max_scale=100.0, key_mask=None, normalize=False):
    out_shape, attn_shape = _forward_shapes(
        "scaled_cross_attention", query, key, value, logit_scale_log, max_scale, key_mask
    )
    return query.new_empty(out_shape), query.new_empty(attn_shape)


@torch.library.register_fake("maskattn::_scaled_cross_attention_backward")
def _(grad_out, grad_attn, query, key, value, logit_scale_log, attn, max_scale, normalize, output_mask):
    op = "_scaled_cross_attention_backward"
    for t, n in (("grad_out", grad_out), ("grad_attn", grad_attn), ("attn", attn)):
        _checks.same_device(n, f"{op}: {t}", query, "query")
    # query, key, value and the scale as the forward checks them; the outputs' shapes follow
    out_shape, attn_shape = _forward_shapes(op, query, key, value, logit_scale_log, max_scale, None)
    _checks.shape(op, grad_out, "grad_out", out_shape)
    _checks.shape(op, attn, "attn", attn_shape)
    _checks.same_dtype(op, grad_out, "grad_out", query, "query")
    _checks.same_dtype(op, attn, "attn", query, "query")
    if grad_attn is not None:
        _checks.shape(op, grad_attn, "grad_attn", attn.shape)
        _checks.same_dtype(op, grad_attn, "grad_attn", attn, "attn")

    def grad(t, needed):  # contiguous, as the kernels return them
        return t.new_empty(t.shape) if needed else t.new_empty((0,))

    return (
        grad(query, output_mask[0]),
        grad(key, output_mask[1]),
        grad(value, output_mask[2]),
        grad(logit_scale_log, output_mask[3]),
    )


# ---- autograd: the inputs and the attention weights (an output) are saved; the logits are
# recomputed in the backward's row pass, which reads the query rows anyway ----


def _setup(ctx, inputs, output):
    query, key, value, logit_scale_log, max_scale, _key_mask, normalize = inputs
    ctx.save_for_backward(query, key, value, logit_scale_log, output[1])
    ctx.max_scale = float(max_scale)
    ctx.normalize = bool(normalize)
    ctx.output_mask = [bool(ctx.needs_input_grad[i]) for i in range(4)]


def _backward(ctx, grad_out, grad_attn):
    query, key, value, logit_scale_log, attn = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)
    dq, dk, dv, ds = _ops._scaled_cross_attention_backward(
        grad_out, grad_attn, query, key, value, logit_scale_log, attn, ctx.max_scale, ctx.normalize, ctx.output_mask
    )
    m = ctx.output_mask
    return (dq if m[0] else None, dk if m[1] else None, dv if m[2] else None, ds if m[3] else None, None, None, None)


torch.library.register_autograd("maskattn::scaled_cross_attention", _backward, setup_context=_setup)

__all__ = ["scaled_cross_attention"]

from . import _registration  # noqa: E402

# Under autocast q/k/v run in the autocast dtype; the learnable scale stays in its own dtype.
_registration.register_low_precision("scaled_cross_attention", keep=("logit_scale_log", "key_mask"))
_registration.forbid_double_backward("_scaled_cross_attention_backward")
