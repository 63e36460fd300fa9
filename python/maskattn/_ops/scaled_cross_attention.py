"""scaled_cross_attention: wrapper, fake kernels, autograd."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as _v
from . import _autograd, _checks, _registration

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
    _v.reject_complex(key_mask, "scaled_cross_attention", "key_mask")
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
    _checks.output_mask(output_mask, 4)
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
    ctx.save_for_forward(query, key, value, logit_scale_log, output[1])
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


# ---- forward mode ----
#   logits = s <qn, kn> with s = min(exp(lsl), max_scale) and qn, kn = F.normalize(q), F.normalize(k)
#   (or q, k); attn = softmax over valid keys; out = attn @ v.
#   dlogits = ds <qn, kn> + s (<dqn, kn> + <qn, dkn>),  ds = exp(lsl) dlsl where exp(lsl) <= max_scale
#   dattn = attn * (dlogits - sum_j attn dlogits),  dout = dattn @ v + attn @ dv
# Keys of weight 0 (masked, -inf, rows without a valid key) take no part, and values no query of
# a sample weighs are cleared, as the forward clears them: their content never reaches a tangent.

_NORM_EPS = 1e-12  # F.normalize's eps, as the kernels use it


def _rows3(x: Tensor, two_d: bool, dim: int, acc) -> Tensor:
    return (x.unsqueeze(dim) if two_d else x).to(acc)


def _normalized(x: Tensor, normalize: bool):
    """(F.normalize(x, dim=-1) or x, (|x|, max(|x|, eps)) or None)."""
    if not normalize:
        return x, None
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    c = n.clamp_min(_NORM_EPS)
    return x / c, (n, c)


def _normalized_tangent(x: Tensor, t: Tensor, norms) -> Tensor:
    if norms is None:
        return t
    n, c = norms
    dc = torch.where(n >= _NORM_EPS, (x * t).sum(-1, keepdim=True) / c, 0)
    return t / c - x * (dc / (c * c))


def _cleared(v: Tensor, attn: Tensor) -> Tensor:
    """v [Bv, Lk, Dv] with the rows no query of a sample weighs set to 0 -> [B, Lk, Dv]."""
    dead = (attn != 0).any(1).logical_not().unsqueeze(-1)  # [B, Lk, 1]
    return torch.where(dead, 0, v)


def _jvp(ctx, t_query, t_key, t_value, t_scale, *_):
    query, key, value, lsl, attn = ctx.saved_tensors
    acc = _autograd.acc_dtype(query.dtype)
    q2d = query.dim() == 2
    q = _rows3(query, q2d, 1, acc)  # [B, Lq, D]
    k = _rows3(key, key.dim() == 2, 0, acc)  # [Bk, Lk, D]
    v = _rows3(value, value.dim() == 2, 0, acc)  # [Bv, Lk, Dv]
    A = _rows3(attn, q2d, 1, acc)  # [B, Lq, Lk]
    live = A != 0
    qn, q_norms = _normalized(q, ctx.normalize)
    kn, k_norms = _normalized(k, ctx.normalize)
    e = lsl.exp()
    s = e.clamp(max=ctx.max_scale).to(acc)
    d_logits = None

    def add(a, b):
        return b if a is None else a + b

    if t_scale is not None:
        ds = torch.where(e <= ctx.max_scale, e * t_scale, 0).to(acc)
        d_logits = add(d_logits, ds * (qn @ kn.transpose(-1, -2)))
    if t_query is not None:
        dqn = _normalized_tangent(q, _rows3(t_query, q2d, 1, acc), q_norms)
        d_logits = add(d_logits, s * (dqn @ kn.transpose(-1, -2)))
    if t_key is not None:
        dkn = _normalized_tangent(k, _rows3(t_key, key.dim() == 2, 0, acc), k_norms)
        d_logits = add(d_logits, s * (qn @ dkn.transpose(-1, -2)))
    d_attn = torch.zeros_like(A)
    d_out = A.new_zeros(A.shape[:-1] + v.shape[-1:])
    if d_logits is not None:
        Ad = A * torch.where(live, d_logits, 0)
        d_attn = Ad - A * Ad.sum(-1, keepdim=True)
        d_out = d_attn @ _cleared(v, A)
    if t_value is not None:
        d_out = d_out + A @ _cleared(_rows3(t_value, value.dim() == 2, 0, acc), A)
    if q2d:
        d_out, d_attn = d_out.squeeze(1), d_attn.squeeze(1)
    return d_out.to(query.dtype), d_attn.to(attn.dtype)


# ---- batching rules ----


def _per_example(V, in_dims, args, fn):
    """fn on each example in turn, results stacked: for a logit scale that differs per example,
    which one kernel call cannot take."""

    def pick(a, d, i):
        return a.select(d, i) if isinstance(a, Tensor) and isinstance(d, int) else a

    results = [fn(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(V)]
    return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])


def _shared_or_folded(x, d, V, B, shared_dims, need_per_example=False):
    """key / value / key_mask as one batch of V * B samples. One shared by the batch (``shared_dims``
    dims: [Lk, D] or [Lk]) stays shared where every example shares it and no gradient per example
    is asked of it; otherwise it is expanded to every sample. Returns (tensor, expanded from shared)."""
    if x is None:
        return None, False
    if x.dim() - (d is not None) != shared_dims:
        return _autograd.fold(x, d, V), False
    if d is None and not need_per_example:
        return x, False
    xb = _autograd.batched(x, d, V).unsqueeze(1)
    xb = xb.expand((V, B) + tuple(xb.shape[2:]))
    return xb.reshape((V * B,) + tuple(xb.shape[2:])), True


def _vmap(info, in_dims, query, key, value, logit_scale_log, max_scale, key_mask, normalize):
    qd, kd, vd, sd, _, md, _ = in_dims
    V = info.batch_size
    if sd is not None:
        args = (query, key, value, logit_scale_log, max_scale, key_mask, normalize)
        return _per_example(V, in_dims, args, _ops.scaled_cross_attention)
    if kd is None and vd is None and md is None and query.dim() in (3, 4):
        # Only the queries vary: the examples' queries are just more query rows of each sample,
        # so keys and values are read once and never copied.
        x = query.movedim(qd, 0)
        q2d = x.dim() == 3
        x = x.unsqueeze(2) if q2d else x  # [V, B, Lq, D]
        _, B, Lq, D = x.shape
        out, attn = _ops.scaled_cross_attention(
            x.transpose(0, 1).reshape(B, V * Lq, D), key, value, logit_scale_log, max_scale, key_mask, normalize
        )
        out, attn = out.view(B, V, Lq, -1), attn.view(B, V, Lq, -1)
        if q2d:
            out, attn = out.squeeze(2), attn.squeeze(2)
        return (out, attn), (1, 1)
    q = _autograd.fold(query, qd, V)
    B = q.shape[0] // V
    k, _ = _shared_or_folded(key, kd, V, B, 2)
    v, _ = _shared_or_folded(value, vd, V, B, 2)
    m, _ = _shared_or_folded(key_mask, md, V, B, 1)
    out, attn = _ops.scaled_cross_attention(q, k, v, logit_scale_log, max_scale, m, normalize)
    return (_autograd.unfold(out, V), _autograd.unfold(attn, V)), (0, 0)


def _scale_grad(grad_out, grad_attn, q, k, v, attn, lsl, max_scale, normalize):
    """d loss / d logit_scale_log of each sample of a [R, ...] batch -> [R], in torch ops.

    With logits = s S: d loss / d s = sum_ij dlogits_ij S_ij, dlogits the softmax backward of
    g = grad_attn + grad_out v^T; times exp(lsl) where exp(lsl) <= max_scale (torch.clamp's rule).
    """
    acc = _autograd.acc_dtype(q.dtype)
    A = attn.to(acc)
    live = A != 0
    g = grad_out.to(acc) @ _cleared(v.to(acc), A).transpose(-1, -2)
    if grad_attn is not None:
        g = g + grad_attn.to(acc)
    Ag = A * torch.where(live, g, 0)
    d_logits = Ag - A * Ag.sum(-1, keepdim=True)
    qn, _ = _normalized(q.to(acc), normalize)
    kn, _ = _normalized(k.to(acc), normalize)
    p = torch.where(live, d_logits * (qn @ kn.transpose(-1, -2)), 0).sum((1, 2))
    e = lsl.exp()
    return torch.where(e <= max_scale, e * p.to(lsl.dtype), 0)


def _vmap_backward(
    info, in_dims, grad_out, grad_attn, query, key, value, logit_scale_log, attn, max_scale, normalize, output_mask
):
    V = info.batch_size
    args = (grad_out, grad_attn, query, key, value, logit_scale_log, attn, max_scale, normalize, output_mask)
    if in_dims[5] is not None:
        return _per_example(V, in_dims, args, _ops._scaled_cross_attention_backward)
    go, ga, q, a = (_autograd.fold(t, in_dims[i], V) for t, i in ((grad_out, 0), (grad_attn, 1), (query, 2), (attn, 6)))
    B = q.shape[0] // V
    # a key / value shared by the batch gets a gradient per example: it is expanded to one per sample
    # and the samples' gradients summed per example
    k, k_expanded = _shared_or_folded(key, in_dims[3], V, B, 2, output_mask[1])
    v, v_expanded = _shared_or_folded(value, in_dims[4], V, B, 2, output_mask[2])
    dq, dk, dv, _ = _ops._scaled_cross_attention_backward(
        go, ga, q, k, v, logit_scale_log, a, max_scale, normalize, list(output_mask[:3]) + [False]
    )

    def per_example(g, needed, expanded):
        if not needed:
            return g, None
        g = _autograd.unfold(g, V)
        return (g.sum(1) if expanded else g), 0

    (dq, qo), (dk, ko), (dv, vo) = (
        per_example(dq, output_mask[0], False),
        per_example(dk, output_mask[1], k_expanded),
        per_example(dv, output_mask[2], v_expanded),
    )
    ds, so = torch.empty(0, dtype=logit_scale_log.dtype, device=logit_scale_log.device), None
    if output_mask[3]:
        q2d = query.dim() - (in_dims[2] is not None) == 2
        rows = _scale_grad(
            go.unsqueeze(1) if q2d else go,
            None if ga is None else (ga.unsqueeze(1) if q2d else ga),
            q.unsqueeze(1) if q2d else q,
            k if k.dim() == 3 else k.unsqueeze(0),
            v if v.dim() == 3 else v.unsqueeze(0),
            a.unsqueeze(1) if q2d else a,
            logit_scale_log,
            max_scale,
            normalize,
        )
        ds, so = rows.view(V, B).sum(1), 0
    return (dq, dk, dv, ds), (qo, ko, vo, so)


_autograd.register("scaled_cross_attention", setup_context=_setup, backward=_backward, jvp=_jvp, vmap=_vmap)
_autograd.register_backward("_scaled_cross_attention_backward", vmap=_vmap_backward)

__all__ = ["scaled_cross_attention"]

# Under autocast q/k/v run in the autocast dtype; the learnable scale stays in its own dtype.
_registration.register_low_precision("scaled_cross_attention", keep=("logit_scale_log", "key_mask"))
