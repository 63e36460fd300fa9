"""gated_attention_scores: the scoring head of gated attention MIL, fused (wrapper, fakes, autograd)."""

import math
from typing import Optional

import torch
from torch import Tensor

from . import _autograd, _checks, _registration

_ops = torch.ops.maskattn

ACTIVATIONS = ("tanh", "relu", "gelu")


def gated_attention_scores(
    v_pre: Tensor,
    u_pre: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    act: str = "tanh",
    v_bias: Optional[Tensor] = None,
    u_bias: Optional[Tensor] = None,
) -> Tensor:
    """``scores = Linear(weight, bias)(act(v_pre + v_bias) * sigmoid(u_pre + u_bias))``, fused.

    The last three steps of CLAM's gated attention net (``Attn_Net_Gated``: ``a = attention_a(x)``,
    ``b = attention_b(x)``, ``A = attention_c(a.mul(b))``) and of Ilse et al.'s gated ABMIL, after
    the two input ``Linear`` layers: ``v_pre`` and ``u_pre`` are those layers' outputs (without their
    biases, which ``v_bias`` / ``u_bias`` add here: the layers then run as plain GEMMs, with no pass
    that copies a bias into their outputs and none that sums their gradients). Neither
    activation nor their product is ever stored: the forward reads ``v_pre`` and ``u_pre`` once and
    writes ``[..., K]``; the backward recomputes the activations and writes the two input gradients
    in one more pass (autograd keeps ``v_pre`` and ``u_pre``, not three ``[..., H]`` activations).

    Args:
        v_pre: ``[..., H]``, the hidden branch before its activation (any strides).
        u_pre: like ``v_pre``, the gate branch before its sigmoid.
        weight: ``[K, H]``, the last layer's weight; ``bias``: ``[K]`` or None.
        act: the hidden branch's activation, ``"tanh"`` (ABMIL, CLAM), ``"relu"`` or ``"gelu"``
            (the erf form, ``torch.nn.GELU()``).
        v_bias, u_bias: ``[H]`` or None, the input layers' biases.

    Returns:
        ``[..., K]`` scores, the dtype of the inputs (half types compute in float32).
    """
    return _ops.gated_attention_scores(v_pre, u_pre, weight, bias, act, v_bias, u_bias)


def _check_act(op: str, act) -> None:
    torch._check(act in ACTIVATIONS, lambda: f"{op}: act must be 'tanh', 'relu' or 'gelu', got '{act}'")


def _check_inputs(op: str, v_pre, u_pre, weight, bias, v_bias, u_bias) -> None:
    others = (("u_pre", u_pre), ("weight", weight), ("bias", bias), ("v_bias", v_bias), ("u_bias", u_bias))
    for name, t in others:
        _checks.same_device(t, f"{op}: {name}", v_pre, "v_pre")
    torch._check(
        v_pre.dim() >= 1, lambda: f"{op}: v_pre must be [..., H] with at least one dim, got shape {list(v_pre.shape)}"
    )
    _checks.floating(op, v_pre, "v_pre")
    torch._check(
        u_pre.shape == v_pre.shape,
        lambda: f"{op}: u_pre {list(u_pre.shape)} must match v_pre {list(v_pre.shape)}",
    )
    H = v_pre.shape[-1]
    torch._check(
        weight.dim() == 2 and weight.shape[1] == H,
        lambda: (
            f"{op}: weight must be [K, H] with H = {H} (the last dim of v_pre {list(v_pre.shape)}), "
            f"got shape {list(weight.shape)}"
        ),
    )
    for name, t in (("v_bias", v_bias), ("u_bias", u_bias)):
        if t is not None:
            torch._check(
                t.dim() == 1 and t.shape[0] == H,
                lambda name=name, t=t: (
                    f"{op}: {name} must be [H] = [{H}] to match v_pre {list(v_pre.shape)}, got shape {list(t.shape)}"
                ),
            )
    for name, t in others:
        _checks.same_dtype(op, t, name, v_pre, "v_pre")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: (
                f"{op}: bias must be [K] = [{weight.shape[0]}] to match weight {list(weight.shape)}, "
                f"got shape {list(bias.shape)}"
            ),
        )


@torch.library.register_fake("maskattn::gated_attention_scores")
def _(v_pre, u_pre, weight, bias=None, act="tanh", v_bias=None, u_bias=None):
    op = "gated_attention_scores"
    _check_inputs(op, v_pre, u_pre, weight, bias, v_bias, u_bias)
    _check_act(op, act)
    return v_pre.new_empty(tuple(v_pre.shape[:-1]) + (weight.shape[0],))


@torch.library.register_fake("maskattn::_gated_attention_scores_backward")
def _(grad, v_pre, u_pre, weight, act, v_bias, u_bias, output_mask):
    op = "_gated_attention_scores_backward"
    _checks.output_mask(output_mask, 6)
    _checks.same_device(grad, f"{op}: grad", v_pre, "v_pre")
    _check_inputs(op, v_pre, u_pre, weight, None, v_bias, u_bias)
    _check_act(op, act)
    _checks.shape(op, grad, "grad", tuple(v_pre.shape[:-1]) + (weight.shape[0],))
    _checks.same_dtype(op, grad, "grad", v_pre, "v_pre")
    K, H = weight.shape
    shapes = (v_pre.shape, v_pre.shape, (K, H), (K,), (H,), (H,))
    return tuple(v_pre.new_empty(s if m else (0,)) for s, m in zip(shapes, output_mask))


def _activation(v: Tensor, act: str):
    """act(v) and act'(v), in v's dtype (the jvp and vmap formulas run in the accumulation dtype)."""
    if act == "tanh":
        a = torch.tanh(v)
        return a, 1 - a * a
    if act == "relu":
        return torch.relu(v), (v > 0).to(v.dtype)
    c = 0.5 * (1 + torch.erf(v * (1 / math.sqrt(2))))
    return v * c, c + v * torch.exp(-0.5 * v * v) * (1 / math.sqrt(2 * math.pi))


def _setup(ctx, inputs, output):
    v_pre, u_pre, weight, bias, act, v_bias, u_bias = inputs
    ctx.save_for_backward(v_pre, u_pre, weight, v_bias, u_bias)
    ctx.save_for_forward(v_pre, u_pre, weight, v_bias, u_bias)
    ctx.act = act
    n = ctx.needs_input_grad
    ctx.output_mask = [bool(n[0]), bool(n[1]), bool(n[2]), bool(n[3]), bool(n[5]), bool(n[6])]


def _backward(ctx, grad):
    v_pre, u_pre, weight, v_bias, u_bias = ctx.saved_tensors
    om = ctx.output_mask
    grads = _ops._gated_attention_scores_backward(grad, v_pre, u_pre, weight, ctx.act, v_bias, u_bias, om)
    gv, gu, gw, gb, gvb, gub = (g if m else None for g, m in zip(grads, om))
    return gv, gu, gw, gb, None, gvb, gub


def _pre_activations(v_pre, u_pre, v_bias, u_bias, acc):
    v, u = v_pre.to(acc), u_pre.to(acc)
    if v_bias is not None:
        v = v + v_bias.to(acc)
    if u_bias is not None:
        u = u + u_bias.to(acc)
    return v, u


def _jvp(ctx, t_v, t_u, t_w, t_b, _t_act, t_vb, t_ub):
    v_pre, u_pre, weight, v_bias, u_bias = ctx.saved_tensors
    acc = _autograd.acc_dtype(v_pre.dtype)
    v, u = _pre_activations(v_pre, u_pre, v_bias, u_bias, acc)
    w = weight.to(acc)
    a, da = _activation(v, ctx.act)
    s = torch.sigmoid(u)
    d = torch.zeros(v.shape[:-1] + (w.shape[0],), dtype=acc, device=v.device)
    tv = tu = None
    for t in (t_v, t_vb):
        if t is not None:
            tv = t.to(acc) if tv is None else tv + t.to(acc)
    for t in (t_u, t_ub):
        if t is not None:
            tu = t.to(acc) if tu is None else tu + t.to(acc)
    dp = None
    if tv is not None:
        dp = da * s * tv
    if tu is not None:
        du = a * s * (1 - s) * tu
        dp = du if dp is None else dp + du
    if dp is not None:
        d = d + dp @ w.T
    if t_w is not None:
        d = d + (a * s) @ t_w.to(acc).T
    if t_b is not None:
        d = d + t_b.to(acc)
    return d.to(v_pre.dtype)


def _per_example(op, V: int, in_dims, args):
    """op on each of the V examples (a loop): where the parameters themselves are batched."""
    outs = [
        op(*(a.select(d, i) if d is not None and isinstance(a, Tensor) else a for a, d in zip(args, in_dims)))
        for i in range(V)
    ]
    if isinstance(outs[0], Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(o) for o in zip(*outs))


def _vmap(info, in_dims, v_pre, u_pre, weight, bias, act, v_bias, u_bias):
    V = info.batch_size
    if all(in_dims[i] is None for i in (2, 3, 5, 6)):
        # rows are independent: the vmapped dim is one more leading dim of v_pre / u_pre
        v = _autograd.batched(v_pre, in_dims[0], V)
        u = _autograd.batched(u_pre, in_dims[1], V)
        return _ops.gated_attention_scores(v, u, weight, bias, act, v_bias, u_bias), 0
    args = (v_pre, u_pre, weight, bias, act, v_bias, u_bias)
    return _per_example(_ops.gated_attention_scores, V, in_dims, args), 0


def _vmap_backward(info, in_dims, grad, v_pre, u_pre, weight, act, v_bias, u_bias, output_mask):
    V = info.batch_size
    out_dims = tuple(0 if m else None for m in output_mask)
    if any(in_dims[i] is not None for i in (3, 5, 6)):
        args = (grad, v_pre, u_pre, weight, act, v_bias, u_bias, output_mask)
        return _per_example(_ops._gated_attention_scores_backward, V, in_dims, args), out_dims
    g = _autograd.batched(grad, in_dims[0], V)
    v = _autograd.batched(v_pre, in_dims[1], V)
    u = _autograd.batched(u_pre, in_dims[2], V)
    # the parameter gradients are sums over each example's rows, not over all V examples' rows:
    # the op gives the row gradients, the sums are taken here per example
    rows = [output_mask[0] or output_mask[4], output_mask[1] or output_mask[5], False, False, False, False]
    gv, gu, _, _, _, _ = _ops._gated_attention_scores_backward(g, v, u, weight, act, v_bias, u_bias, rows)
    empty = v_pre.new_empty((0,))
    gw = gb = gvb = gub = empty
    H, K = weight.shape[1], weight.shape[0]
    acc = _autograd.acc_dtype(v_pre.dtype)
    g2 = g.to(acc).reshape(V, -1, K)
    if output_mask[2]:
        va, ua = _pre_activations(v, u, v_bias, u_bias, acc)
        p = _activation(va, act)[0] * torch.sigmoid(ua)
        gw = torch.einsum("vmk,vmh->vkh", g2, p.reshape(V, -1, H)).to(v_pre.dtype)
    if output_mask[3]:
        gb = g2.sum(1).to(v_pre.dtype)
    if output_mask[4]:
        gvb = gv.to(acc).reshape(V, -1, H).sum(1).to(v_pre.dtype)
    if output_mask[5]:
        gub = gu.to(acc).reshape(V, -1, H).sum(1).to(v_pre.dtype)
    outs = (gv if output_mask[0] else empty, gu if output_mask[1] else empty, gw, gb, gvb, gub)
    return outs, out_dims


_autograd.register("gated_attention_scores", setup_context=_setup, backward=_backward, jvp=_jvp, vmap=_vmap)
_autograd.register_backward("_gated_attention_scores_backward", vmap=_vmap_backward)
_registration.register_low_precision("gated_attention_scores")
