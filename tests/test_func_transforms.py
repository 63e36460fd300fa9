"""torch.func and forward-mode AD through every maskattn op, in float64 against the pure-PyTorch
references: jvp, jacfwd, jacrev, grad, vjp, torch.autograd.forward_ad dual numbers, vmap over
several in_dims (with real batching rules, never the per-example fallback), per-example gradients
(vmap of grad), second derivatives where they exist (jacrev(jacfwd), jacfwd(jacfwd)) and a clear
error where they do not (forward-over-reverse, double backward). Inputs hold fully masked rows,
-inf logits, empty bags and a scale above its cap."""

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as pytree
from conftest import DEVICES
from reference_gated_attention_scores import reference_gated_attention_scores
from reference_gated_masked_mean import reference_gated_masked_mean
from reference_masked_attention_pool import reference_pool, reference_pool_packed
from reference_masked_channel_attention_pool import reference_channel_pool, reference_channel_pool_packed
from test_properties_masked_softmax import reference_masked_softmax
from test_properties_scaled_cross_attention import reference_cross_attention
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import maskattn

DT = torch.float64
TOL = dict(atol=1e-9, rtol=1e-7)
V = 3  # vmapped examples


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    """Every vmap here (jacfwd, jacrev, per-example gradients too) must find batching rules: the
    per-example fallback raises instead of warning (its warning does not reach Python)."""
    previous = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(previous)


def close(actual, expected, **tol):
    a, e = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e):
        assert x.shape == y.shape, (x.shape, y.shape)
        torch.testing.assert_close(x, y, **(tol or TOL))


# ---- the ops as functions of all their arguments, with inputs built per example ----


@dataclass
class Case:
    name: str
    build: Callable  # (generator, device) -> all of the op's arguments
    op: Callable  # the public function (or torch.ops.maskattn.<op>), same arguments
    ref: Callable  # the float64 reference, same arguments
    diff: Tuple[int, ...]  # positions of the differentiable arguments
    vmap_dims: Tuple[tuple, ...]  # in_dims to vmap over, one entry per argument


def _pool_args(g, device, k):
    B, N, D = 3, 6, 4
    logits = torch.randn((B, N) + ((k,) if k else ()), generator=g, dtype=DT)
    features = torch.randn(B, N, D, generator=g, dtype=DT)
    mask = torch.rand(B, N, generator=g) > 0.3
    mask[0, :3] = True
    mask[1] = False  # a bag with no valid row
    logits[0, 1] = float("-inf")  # a valid row of weight 0
    return logits.to(device), features.to(device), mask.to(device)


def _packed_args(g, device, k):
    T, D = 9, 4
    logits = torch.randn((T,) + ((k,) if k else ()), generator=g, dtype=DT)
    features = torch.randn(T, D, generator=g, dtype=DT)
    cut = sorted(torch.randint(0, T + 1, (2,), generator=g).tolist())
    offsets = torch.tensor([0, cut[0], cut[0], cut[1], T])  # bag 1 is empty
    logits[int(torch.randint(0, T, (1,), generator=g))] = float("-inf")
    return logits.to(device), features.to(device), offsets.to(device)


def _channel_args(g, device, packed):
    """PyG's feature-level gate: one logit per row and channel."""
    if packed:
        logits, features, offsets = _packed_args(g, device, 0)
        logits = torch.randn(features.shape, generator=g, dtype=DT).to(device)
        logits[int(torch.randint(0, logits.shape[0], (1,), generator=g)), 2] = float("-inf")
        return logits, features, offsets
    _, features, mask = _pool_args(g, device, 0)
    logits = torch.randn(features.shape, generator=g, dtype=DT)
    logits[0, 1, 1] = float("-inf")  # a valid row of weight 0 in one channel
    logits[2, :, 3] = float("-inf")  # a channel without weight
    return logits.to(device), features, mask


def _softmax_args(g, device):
    scores = torch.randn(3, 2, 7, generator=g, dtype=DT)
    mask = torch.rand(3, 1, 7, generator=g) > 0.4
    mask[0, 0, :2] = True
    mask[2] = False  # every row of sample 2 is fully masked
    scores[0, 1, 1] = float("-inf")
    return scores.to(device), mask.to(device), -1, 0.7


def _gated_scores_args(g, device, act="tanh"):
    v, u = torch.randn(4, 3, 5, generator=g, dtype=DT), torch.randn(4, 3, 5, generator=g, dtype=DT)
    w, b = torch.randn(2, 5, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT)
    bv, bu = torch.randn(5, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    return v.to(device), u.to(device), w.to(device), b.to(device), act, bv.to(device), bu.to(device)


def _gated_args(g, device, gate4d=True):
    B, C, H, W = 3, 4, 3, 5
    features = torch.randn(B, C, H, W, generator=g, dtype=DT)
    logits = torch.randn((B, 1, H, W) if gate4d else (B, H, W), generator=g, dtype=DT)
    mask = torch.rand(B, H, W, generator=g) > 0.4
    mask[1] = False  # no valid pixel
    return features.to(device), logits.to(device), mask.to(device)


def _xattn_args(g, device, q2d=False, shared=True, lk=5, lsl=math.log(20.0), normalize=True, max_scale=100.0):
    B, Lq, D, Dv = 3, 2, 4, 3
    q = torch.randn((B, D) if q2d else (B, Lq, D), generator=g, dtype=DT)
    k = torch.randn((lk, D) if shared else (B, lk, D), generator=g, dtype=DT)
    v = torch.randn((lk, Dv) if shared else (B, lk, Dv), generator=g, dtype=DT)
    mask = torch.rand(B, lk, generator=g) > 0.3
    mask[0, :2] = True
    mask[2] = False  # no valid key
    s = torch.tensor(lsl, dtype=DT) + 0.1 * torch.rand((), generator=g, dtype=DT)
    return q.to(device), k.to(device), v.to(device), s.to(device), max_scale, mask.to(device), normalize


def _softmax_ref(scores, mask, dim, scale):
    return reference_masked_softmax(scores, mask, dim, scale)


CASES = [
    Case(
        "pool",
        lambda g, d: _pool_args(g, d, 0),
        maskattn.masked_attention_pool,
        reference_pool,
        (0, 1),
        ((0, 0, 0), (0, None, None), (None, 0, None), (None, None, 0), (1, 2, None)),
    ),
    Case(
        "pool_branches",
        lambda g, d: _pool_args(g, d, 2),
        lambda *a: torch.ops.maskattn.masked_attention_pool(*a),
        reference_pool,
        (0, 1),
        ((0, 0, 0), (3, None, None), (None, 1, 1)),
    ),
    Case(
        "pool_packed",
        lambda g, d: _packed_args(g, d, 0),
        maskattn.masked_attention_pool_packed,
        reference_pool_packed,
        (0, 1),
        ((0, 0, 0), (0, None, None), (None, 0, None), (None, None, 0), (1, 1, None)),
    ),
    Case(
        "pool_packed_branches",
        lambda g, d: _packed_args(g, d, 3),
        lambda *a: torch.ops.maskattn.masked_attention_pool_packed(*a),
        reference_pool_packed,
        (0, 1),
        ((0, 0, 0), (2, None, None)),
    ),
    Case(
        "channel_pool",
        lambda g, d: _channel_args(g, d, False),
        maskattn.masked_channel_attention_pool,
        reference_channel_pool,
        (0, 1),
        ((0, 0, 0), (0, None, None), (None, 0, None), (None, None, 0), (1, 2, None), (3, 3, None)),
    ),
    Case(
        "channel_pool_packed",
        lambda g, d: _channel_args(g, d, True),
        lambda *a: torch.ops.maskattn.masked_channel_attention_pool_packed(*a),
        reference_channel_pool_packed,
        (0, 1),
        ((0, 0, 0), (0, None, None), (None, 0, None), (None, None, 0), (1, 2, None)),
    ),
    Case(
        "softmax",
        _softmax_args,
        maskattn.masked_softmax,
        _softmax_ref,
        (0,),
        ((0, 0, None, None), (0, None, None, None), (None, 0, None, None), (2, 1, None, None)),
    ),
    Case(
        "softmax_dim1",
        lambda g, d: _softmax_args(g, d)[:2] + (1, 1.3),
        lambda *a: torch.ops.maskattn.masked_softmax(*a),
        _softmax_ref,
        (0,),
        ((0, 0, None, None), (1, None, None, None)),
    ),
    Case(
        "gated",
        _gated_args,
        maskattn.gated_masked_mean,
        reference_gated_masked_mean,
        (0, 1),
        ((0, 0, 0), (None, 0, None), (0, None, None), (None, None, 0), (4, 1, None)),
    ),
    Case(
        "gated_attention_scores",
        _gated_scores_args,
        maskattn.gated_attention_scores,
        reference_gated_attention_scores,
        (0, 1, 2, 3, 5, 6),
        (
            (0, 0, None, None, None, None, None),
            (None, 1, None, None, None, None, None),
            (0, 0, None, None, None, 0, 0),
            (0, None, 0, 0, None, None, None),
        ),
    ),
    Case(
        "gated_attention_scores_gelu",
        lambda g, d: _gated_scores_args(g, d, "gelu"),
        lambda *a: torch.ops.maskattn.gated_attention_scores(*a),
        reference_gated_attention_scores,
        (0, 1, 2, 3, 5, 6),
        ((2, 2, None, None, None, None, None), (None, None, 0, None, None, None, None)),
    ),
    Case(
        "gated_3d_logits",
        lambda g, d: _gated_args(g, d, gate4d=False),
        lambda *a: torch.ops.maskattn.gated_masked_mean(*a),
        reference_gated_masked_mean,
        (0, 1),
        ((0, 0, None), (None, 2, 0)),
    ),
    Case(
        "xattn",
        _xattn_args,
        maskattn.scaled_cross_attention,
        reference_cross_attention,
        (0, 1, 2, 3),
        (
            (0, 0, 0, None, None, 0, None),
            (0, None, None, None, None, None, None),
            (None, 0, None, None, None, None, None),
            (None, None, None, None, None, 0, None),
            (None, None, None, 0, None, None, None),
            (1, None, 1, None, None, None, None),
        ),
    ),
    Case(
        "xattn_above_cap_dot",
        lambda g, d: _xattn_args(g, d, q2d=True, shared=False, lsl=math.log(150.0), normalize=False),
        lambda *a: torch.ops.maskattn.scaled_cross_attention(*a),
        reference_cross_attention,
        (0, 1, 2, 3),
        ((0, 0, 0, None, None, 0, None), (1, None, None, None, None, None, None), (None, 2, 0, None, None, 1, None)),
    ),
    Case(
        "xattn_gemm_path",
        lambda g, d: _xattn_args(g, d, lk=12, max_scale=math.inf),
        maskattn.scaled_cross_attention,
        reference_cross_attention,
        (0, 1, 2, 3),
        ((0, 0, 0, None, None, 0, None), (0, None, None, None, None, None, None), (None, 0, 0, None, None, None, None)),
    ),
]
IDS = [c.name for c in CASES]


def _outs(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _args(case, device, seed=0):
    return case.build(torch.Generator().manual_seed(seed), device)


def _of_diff(case, args):
    """(f, primals): the op as a function of its differentiable arguments only."""

    def bind(fn):
        def f(*d):
            full = list(args)
            for i, x in zip(case.diff, d):
                full[i] = x
            return _outs(fn(*full))

        return f

    return bind(case.op), bind(case.ref), tuple(args[i] for i in case.diff)


def _like(xs, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) for x in xs)


def _finite(args):
    """-inf logits replaced: differences of second derivatives need finite inputs everywhere."""
    return tuple(a.nan_to_num(neginf=-3.0) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(case, device):
    args = _args(case, device)
    close(_outs(case.op(*args)), _outs(case.ref(*args)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp(case, device):
    f, r, primals = _of_diff(case, _args(case, device))
    tangents = _like(primals, 1)
    out, t = jvp(f, primals, tangents)
    out_r, t_r = jvp(r, primals, tangents)
    close(out, out_r)
    close(t, t_r)
    assert all(x.abs().sum() > 0 for x in t)  # a tangent that is all zeros cannot pass for one
    # one argument's tangent at a time (the others' are None inside the op's jvp)
    for i in range(len(primals)):
        only = tuple(x if j == i else torch.zeros_like(x) for j, x in enumerate(tangents))
        close(jvp(f, primals, only)[1], jvp(r, primals, only)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_ad_dual_numbers(case, device):
    args = _args(case, device)
    f, r, primals = _of_diff(case, args)
    tangents = _like(primals, 2)
    expected = jvp(r, primals, tangents)[1]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        got = tuple(fwAD.unpack_dual(y).tangent for y in f(*duals))
    close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jacfwd_and_jacrev(case, device):
    f, r, primals = _of_diff(case, _args(case, device))
    argnums = tuple(range(len(primals)))
    expected = jacrev(r, argnums)(*primals)
    close(jacfwd(f, argnums)(*primals), expected)
    close(jacrev(f, argnums)(*primals), expected)


def _loss(fn, weights):
    def loss(*d):
        return sum((y * w).sum() for y, w in zip(fn(*d), weights))

    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_and_vjp(case, device):
    f, r, primals = _of_diff(case, _args(case, device))
    cot = _like(f(*primals), 3)
    argnums = tuple(range(len(primals)))
    close(grad(_loss(f, cot), argnums)(*primals), grad(_loss(r, cot), argnums)(*primals))
    _, pull = vjp(f, *primals)
    _, pull_r = vjp(r, *primals)
    close(pull(cot), pull_r(cot))


def _stack_args(case, device, in_dims):
    """V examples' arguments, stacked at in_dims (None: the first example's, shared)."""
    per = [_args(case, device, seed) for seed in range(V)]
    out = []
    for i, d in enumerate(in_dims):
        out.append(per[0][i] if d is None else torch.stack([p[i] for p in per], d))
    return tuple(out)


def _unstack(args, in_dims, v):
    return tuple(a if d is None else a.select(d, v) for a, d in zip(args, in_dims))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap(case, device):
    for in_dims in case.vmap_dims:
        args = _stack_args(case, device, in_dims)
        got = vmap(lambda *a: _outs(case.op(*a)), in_dims)(*args)
        expected = tuple(torch.stack(z) for z in zip(*[_outs(case.op(*_unstack(args, in_dims, v))) for v in range(V)]))
        close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_example_gradients(case, device):
    """vmap(grad(loss)) over examples whose every argument (masks, offsets too) differs."""
    in_dims = tuple(0 if torch.is_tensor(a) else None for a in _args(case, device))
    args = _stack_args(case, device, in_dims)
    cot = _like(_outs(case.op(*_unstack(args, in_dims, 0))), 4)
    argnums = tuple(range(len(case.diff)))

    def per_example(*a):
        f, _, primals = _of_diff(case, a)
        return grad(_loss(f, cot), argnums)(*primals)

    def per_example_ref(*a):
        _, r, primals = _of_diff(case, a)
        return grad(_loss(r, cot), argnums)(*primals)

    got = vmap(per_example, in_dims)(*args)
    expected = tuple(torch.stack(z) for z in zip(*[per_example_ref(*_unstack(args, in_dims, v)) for v in range(V)]))
    close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_second_derivatives_forward_mode(case, device):
    """Hessians by reverse-over-forward and forward-over-forward: the jvp formulas are themselves
    differentiable."""
    f, r, primals = _of_diff(case, _finite(_args(case, device)))
    cot = _like(f(*primals), 5)
    loss, loss_r = _loss(f, cot), _loss(r, cot)
    argnums = tuple(range(len(primals)))
    expected = jacrev(jacrev(loss_r, argnums), argnums)(*primals)
    close(jacrev(jacfwd(loss, argnums), argnums)(*primals), expected, atol=1e-8, rtol=1e-6)
    close(jacfwd(jacfwd(loss, argnums), argnums)(*primals), expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_differentiating_a_gradient_raises(case, device):
    """Forward-over-reverse and double backward reach the backward op, which has no derivative:
    they raise naming maskattn and the op instead of treating the gradient as a constant."""
    args = _finite(_args(case, device))
    f, _, primals = _of_diff(case, args)
    cot = _like(f(*primals), 6)
    loss = _loss(f, cot)
    pattern = r"maskattn::_\w+_backward: double backward .* is not supported"
    with pytest.raises(RuntimeError, match=pattern):
        jacfwd(jacrev(loss))(*primals)
    with pytest.raises(RuntimeError, match=pattern):
        torch.func.hessian(loss)(*primals)
    leaves = [p.detach().requires_grad_() for p in primals]
    (g,) = torch.autograd.grad(loss(*leaves), leaves[:1], create_graph=True)
    with pytest.raises(RuntimeError, match=pattern):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_xattn_cleared_values_keep_tangents_finite(device):
    """A value row that no query weighs (its key masked for every sample) may hold NaN: the output
    ignores it, and so must every tangent and jacobian."""
    q, k, v, s, cap, mask, norm = _xattn_args(torch.Generator().manual_seed(0), device)
    mask[:, -1] = False
    v_bad, k_bad = v.clone(), k.clone()
    v_bad[-1], k_bad[-1] = float("nan"), float("inf")
    t = _like((q, k, v, s), 7)

    def f(q, k, v, s):
        return maskattn.scaled_cross_attention(q, k, v, s, cap, mask, norm)

    bad = jvp(f, (q, k_bad, v_bad, s), t)[1]
    assert all(x.isfinite().all() for x in bad)
    clean_t = (t[0], t[1].clone(), t[2].clone(), t[3])
    clean_t[1][-1], clean_t[2][-1] = 0.0, 0.0
    close(
        bad, jvp(f, (q, k.clone().index_fill_(0, torch.tensor([k.shape[0] - 1], device=device), 0.0), v, s), clean_t)[1]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_pool_padding_content_never_reaches_tangents(device):
    logits, features, mask = _pool_args(torch.Generator().manual_seed(0), device, 0)
    features = features.masked_fill(~mask.unsqueeze(-1), float("nan"))
    tl, tf = _like((logits, features), 8)
    tf = tf.masked_fill(~mask.unsqueeze(-1), float("inf"))
    _, (tp, tw) = jvp(lambda l, f: maskattn.masked_attention_pool(l, f, mask), (logits, features), (tl, tf))
    assert tp.isfinite().all() and tw.isfinite().all()
    assert (tw[~mask] == 0).all() and (tp[1] == 0).all()  # padding and the empty bag: zero tangents


@pytest.mark.parametrize("device", DEVICES)
def test_scale_tangent_is_zero_above_the_cap(device):
    q, k, v, s, _, mask, norm = _xattn_args(torch.Generator().manual_seed(0), device)

    def f(s, cap):
        return maskattn.scaled_cross_attention(q, k, v, s, cap, mask, norm)

    for cap, zero in ((10.0, True), (100.0, False)):  # exp(s) is about 20
        _, (t_out, t_attn) = jvp(lambda s: f(s, cap), (s,), (torch.ones_like(s),))
        assert bool((t_out == 0).all() and (t_attn == 0).all()) == zero


def test_non_differentiable_ops_vmap():
    g = torch.Generator().manual_seed(0)
    image_masks = torch.rand(V, 2, 8, 12, generator=g) > 0.3
    got = vmap(maskattn.patch_mask, (0, None))(image_masks, 4)
    images = torch.rand(V, 2, 3, 16, 16, generator=g)
    fg = vmap(maskattn.foreground_mask)(images)
    close(got, torch.stack([maskattn.patch_mask(m, 4) for m in image_masks]))
    close(fg, tuple(torch.stack(z) for z in zip(*[maskattn.foreground_mask(x) for x in images])))


# ---- the padding bridges (pure torch): linear, so a tangent is the bridge applied to the tangent ----


@pytest.mark.parametrize("device", DEVICES)
def test_pack_unpack_pad_sequences_under_transforms(device):
    g = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 5, 2, generator=g, dtype=DT).to(device)
    mask = (torch.rand(3, 5, generator=g) > 0.4).to(device)
    mask[1] = False
    t = torch.randn(padded.shape, generator=g, dtype=DT).to(device)
    packed, offsets = maskattn.pack(padded, mask)

    def pack(p):
        return maskattn.pack(p, mask)[0]

    def unpack(p):
        return maskattn.unpack(p, offsets, 5)[0]

    close(jvp(pack, (padded,), (t,))[1], pack(t))
    close(jacfwd(pack)(padded), jacrev(pack)(padded))
    tp = pack(t)
    close(jvp(unpack, (packed,), (tp,))[1], unpack(tp))
    close(jacfwd(unpack)(packed), jacrev(unpack)(packed))
    stacked = torch.stack([padded, t, -padded])
    close(vmap(pack)(stacked), torch.stack([pack(x) for x in stacked]))
    packs = vmap(pack)(stacked).transpose(0, 1)  # the examples at dim 1
    close(vmap(unpack, in_dims=1)(packs), torch.stack([unpack(x) for x in packs.unbind(1)]))

    seqs = [torch.randn(n, 2, generator=g, dtype=DT).to(device) for n in (2, 4, 0, 3)]
    pv, mv = vmap(lambda *s: maskattn.pad_sequences(list(s)))(*[torch.stack([s, 2 * s]) for s in seqs])
    p0, m0 = maskattn.pad_sequences(seqs)
    close(pv, torch.stack([p0, 2 * p0]))
    close(mv, torch.stack([m0, m0]))
    ts = [torch.ones_like(s) for s in seqs]
    close(jvp(lambda *s: maskattn.pad_sequences(list(s))[0], tuple(seqs), tuple(ts))[1], maskattn.pad_sequences(ts)[0])

    # a per-example mask or offsets would give each example its own number or placement of rows
    with pytest.raises(RuntimeError, match=r"maskattn\.pack's mask cannot be vmapped"):
        vmap(lambda m: maskattn.pack(padded, m)[0])(torch.stack([mask, ~mask]))
    with pytest.raises(RuntimeError, match=r"maskattn\.unpack's offsets cannot be vmapped"):
        vmap(lambda o: maskattn.unpack(packed, o, 5)[0])(torch.stack([offsets, offsets]))


# ---- the modules, through torch.func.functional_call ----


def _module_cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(V, 6, 8, generator=g, dtype=DT).to(device)
    mask = (torch.rand(V, 6, generator=g) > 0.3).to(device)
    mask[:, 0] = True
    mask[1, 3:] = False
    img = torch.randn(V, 4, 5, 6, generator=g, dtype=DT).to(device)
    img_mask = (torch.rand(V, 5, 6, generator=g) > 0.3).to(device)
    protos = torch.randn(5, 8, generator=g, dtype=DT).to(device)
    torch.manual_seed(0)
    nn = maskattn.nn
    return {
        "AttentionPooling": (nn.AttentionPooling(8, 16, gated=True, branches=2), (x, mask), {}),
        "MaskedSelfAttention": (nn.MaskedSelfAttention(8, 2), (x, mask), {}),
        "MaskedSelfAttention_weights": (nn.MaskedSelfAttention(8, 2), (x, mask), {"need_weights": True}),
        "LearnableScaleCrossAttention": (nn.LearnableScaleCrossAttention(8), (x, protos), {}),
        "SpatialAttentionPool": (nn.SpatialAttentionPool(4, 6), (img, img_mask), {}),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_module_cases("cpu")))
def test_modules_under_func_transforms(name, device):
    """Per-example gradients (vmap of grad) match a loop; forward mode (jvp in the parameters)
    matches reverse mode; module state (the cross-attention stats) is not written from inside a
    transform, where it would keep the transform's wrapped tensors."""
    mod, inputs, kwargs = _module_cases(device)[name]
    mod = mod.to(device=device, dtype=DT)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    shared = [t is not inputs[0] and t.shape[0] != V for t in inputs]  # the prototypes

    def loss(p, *a):
        a = tuple(t if s else t.unsqueeze(0) for t, s in zip(a, shared))
        y = torch.func.functional_call(mod, p, a, kwargs)
        return sum((t**2).sum() for t in (y if isinstance(y, tuple) else (y,)))

    in_dims = (None,) + tuple(None if s else 0 for s in shared)
    got = vmap(grad(loss), in_dims)(params, *inputs)
    for i in range(V):
        one = grad(loss)(params, *(t if s else t[i] for t, s in zip(inputs, shared)))
        close({k: v[i] for k, v in got.items()}, one)

    one_input = tuple(t if s else t[0] for t, s in zip(inputs, shared))
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    value, t_loss = jvp(lambda p: loss(p, *one_input), (params,), (tangents,))
    g = grad(loss)(params, *one_input)
    close(t_loss, sum((g[k] * tangents[k]).sum() for k in params))
    plain = mod(*(t if s else t[:1] for t, s in zip(inputs, shared)), **kwargs)
    close(value, sum((t**2).sum() for t in (plain if isinstance(plain, tuple) else (plain,))))
    if hasattr(mod, "stats"):
        mod.stats = {}
        vmap(grad(loss), in_dims)(params, *inputs)
        assert mod.stats == {}


def test_compiled_autograd_takes_the_backward_graph():
    """The ops' autograd nodes carry what torch._dynamo's compiled autograd keys backward graphs on."""
    from torch._dynamo import compiled_autograd

    def grads(compiled):
        args = [a.detach().requires_grad_() for a in _args(CASES[0], "cpu")[:2]]
        scores = args[0].detach().nan_to_num(neginf=0.0).requires_grad_()
        mask = _args(CASES[0], "cpu")[2]
        pooled, weights = maskattn.masked_attention_pool(*args, mask)
        loss = (pooled**2).sum() + (weights * maskattn.masked_softmax(scores, mask)).sum()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        return [a.grad for a in args + [scores]]

    torch._dynamo.reset()
    close(grads(True), grads(False))
