"""Outputs behave like the outputs of the layers they replace: every op's and every module's outputs
are tensors of their own (not views), so in-place updates (``pooled += bias``, ``out.mul_(2)``)
work with and without autograd, eager and compiled; gradients through an in-place update match the
out-of-place computation; and modifying an output that the backward saved (the weights) raises
autograd's usual error at backward instead of giving a wrong gradient."""

import pytest
import torch
from conftest import DEVICES

import maskattn

DT = torch.float64
SAVED = "modified by an inplace operation"


def _pool(device, k=0):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 5) + ((k,) if k else ()), generator=g, dtype=DT).to(device)
    features = torch.randn(3, 5, 4, generator=g, dtype=DT).to(device)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(device)
    return (logits, features), lambda l, f: maskattn.masked_attention_pool(l, f, mask)


def _packed(device, k=0):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((7,) + ((k,) if k else ()), generator=g, dtype=DT).to(device)
    features = torch.randn(7, 4, generator=g, dtype=DT).to(device)
    offsets = torch.tensor([0, 3, 3, 7], device=device)
    return (logits, features), lambda l, f: maskattn.masked_attention_pool_packed(l, f, offsets)


def _softmax(device):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 6, generator=g, dtype=DT).to(device)
    mask = (torch.rand(2, 1, 6, generator=g) > 0.3).to(device)
    return (scores,), lambda s: (maskattn.masked_softmax(s, mask, -1, 0.5),)


def _gated(device, gate4d=True):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=DT).to(device)
    logits = torch.randn((2, 1, 4, 5) if gate4d else (2, 4, 5), generator=g, dtype=DT).to(device)
    mask = (torch.rand(2, 4, 5, generator=g) > 0.3).to(device)
    return (features, logits), lambda f, l: maskattn.gated_masked_mean(f, l, mask)


def _gated_scores(device):
    g = torch.Generator().manual_seed(7)
    v, u = (torch.randn(5, 3, 4, generator=g, dtype=DT).to(device) for _ in range(2))
    w, b = torch.randn(2, 4, generator=g, dtype=DT).to(device), torch.randn(2, generator=g, dtype=DT).to(device)
    bv, bu = (torch.randn(4, generator=g, dtype=DT).to(device) for _ in range(2))
    return (v, u, w, b, bv, bu), lambda *a: (maskattn.gated_attention_scores(*a[:4], "tanh", *a[4:]),)


def _xattn(device, q2d=False, lk=5):
    g = torch.Generator().manual_seed(4)
    q = torch.randn((3, 4) if q2d else (3, 2, 4), generator=g, dtype=DT).to(device)
    k = torch.randn(lk, 4, generator=g, dtype=DT).to(device)
    v = torch.randn(lk, 3, generator=g, dtype=DT).to(device)
    s = torch.tensor(2.0, dtype=DT, device=device)
    mask = (torch.rand(3, lk, generator=g) > 0.3).to(device)
    return (q, k, v, s), lambda q, k, v, s: maskattn.scaled_cross_attention(q, k, v, s, 100.0, mask, True)


def _channel(device):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 4, generator=g, dtype=DT).to(device)
    features = torch.randn(3, 5, 4, generator=g, dtype=DT).to(device)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(device)
    return (logits, features), lambda l, f: maskattn.masked_channel_attention_pool(l, f, mask)


def _channel_packed(device):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 4, generator=g, dtype=DT).to(device)
    features = torch.randn(7, 4, generator=g, dtype=DT).to(device)
    offsets = torch.tensor([0, 3, 3, 7], device=device)
    return (logits, features), lambda l, f: maskattn.masked_channel_attention_pool_packed(l, f, offsets)


# (name, build, indices of the outputs the backward saves)
OPS = [
    ("pool", _pool, {1}),
    ("pool_branches", lambda d: _pool(d, 2), {1}),
    ("pool_packed", _packed, {1}),
    ("pool_packed_branches", lambda d: _packed(d, 3), {1}),
    ("softmax", _softmax, {0}),
    ("gated", _gated, {1}),
    ("gated_3d_logits", lambda d: _gated(d, False), {1}),
    ("xattn", _xattn, {1}),
    ("xattn_one_query", lambda d: _xattn(d, q2d=True), {1}),
    ("xattn_gemm_path", lambda d: _xattn(d, lk=12), {1}),
    # pooled is free: the backward saves a copy of it
    ("channel_pool", _channel, {1}),
    ("channel_pool_packed", _channel_packed, {1}),
    # the backward recomputes from the inputs: the scores are not saved
    ("gated_attention_scores", _gated_scores, set()),
]
IDS = [o[0] for o in OPS]


def _leaves(inputs):
    return [x.detach().clone().requires_grad_() for x in inputs]


def _bump(y, i):
    """A different update per output, each a fresh tensor like y."""
    return torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape) * (i + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,saved", OPS, ids=IDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_outputs_are_not_views_and_take_inplace_updates(name, build, saved, requires_grad, device):
    inputs, fn = build(device)
    args = _leaves(inputs) if requires_grad else inputs
    outs = fn(*args)
    expected = [(y.detach() + _bump(y, i)) * 2 for i, y in enumerate(outs)]
    for i, y in enumerate(outs):
        assert not y._is_view(), f"output {i} is a view of a tensor of shape {tuple(y._base.shape)}"
        y += _bump(y, i)
        y.mul_(2)
    for y, e in zip(outs, expected):
        torch.testing.assert_close(y.detach(), e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,saved", OPS, ids=IDS)
def test_gradient_through_inplace_update_matches_out_of_place(name, build, saved, device):
    inputs, fn = build(device)
    free = [i for i in range(len(fn(*inputs))) if i not in saved]
    if not free:
        pytest.skip("the op's only output is saved for backward (see test_modifying_a_saved_output_raises)")
    a, b = _leaves(inputs), _leaves(inputs)
    outs_a, outs_b = fn(*a), fn(*b)
    loss_a = loss_b = 0
    for i in free:
        y = outs_a[i]
        y += _bump(y, i)
        y.mul_(3)
        loss_a = loss_a + (y * y).sum()
        z = (outs_b[i] + _bump(outs_b[i], i)) * 3
        loss_b = loss_b + (z * z).sum()
    loss_a.backward()
    loss_b.backward()
    for x, y in zip(a, b):
        assert x.grad is not None and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,saved", OPS, ids=IDS)
def test_modifying_a_saved_output_raises_at_backward(name, build, saved, device):
    inputs, fn = build(device)
    for i in saved:
        outs = fn(*_leaves(inputs))
        loss = sum(y.sum() for y in outs)
        outs[i].mul_(2)  # the update itself is allowed ...
        with pytest.raises(RuntimeError, match=SAVED):  # ... but the gradient it would corrupt is refused
            loss.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,saved", OPS, ids=IDS)
def test_inplace_under_inference_mode(name, build, saved, device):
    inputs, fn = build(device)
    with torch.inference_mode():
        outs = fn(*inputs)
        for y in outs:
            y.add_(1)
    torch.testing.assert_close(outs[0], fn(*inputs)[0] + 1)


@pytest.mark.parametrize(
    "name,build,saved",
    OPS[:1] + OPS[2:3] + OPS[5:6] + OPS[7:8] + OPS[10:11],
    ids=["pool", "packed", "gated", "xattn", "channel_pool"],
)
def test_inplace_update_compiled(name, build, saved):
    inputs, fn = build("cpu")
    free = [i for i in range(len(fn(*inputs))) if i not in saved]

    def step(*args):
        outs = fn(*args)
        for i in free:
            outs[i].add_(1.5)
            outs[i].mul_(2)
        return sum((outs[i] ** 2).sum() for i in free)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    a, b = _leaves(inputs), _leaves(inputs)
    la, lb = step(*a), compiled(*b)
    torch.testing.assert_close(lb, la)
    la.backward()
    lb.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_under_torch_func_grad(device):
    (logits, features), fn = _pool(device)

    def loss(l):
        pooled, _ = fn(l, features)
        pooled.mul_(2)
        return (pooled**2).sum()

    expected = torch.func.grad(lambda l: ((fn(l, features)[0] * 2) ** 2).sum())(logits)
    torch.testing.assert_close(torch.func.grad(loss)(logits), expected)


# ---- modules ----


def _modules(device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 8, generator=g, dtype=DT).to(device)
    mask = (torch.rand(3, 6, generator=g) > 0.3).to(device)
    mask[:, 0] = True
    img = torch.randn(2, 4, 5, 6, generator=g, dtype=DT).to(device)
    img_mask = (torch.rand(2, 5, 6, generator=g) > 0.3).to(device)
    protos = torch.randn(4, 8, generator=g, dtype=DT).to(device)
    return [
        ("AttentionPooling", maskattn.nn.AttentionPooling(8, 16), (x, mask), {1}),
        (
            "AttentionPooling_gated_branches",
            maskattn.nn.AttentionPooling(8, 16, gated=True, branches=2),
            (x, mask),
            {1},
        ),
        ("MaskedSelfAttention", maskattn.nn.MaskedSelfAttention(8, 2), (x, mask), set()),
        ("LearnableScaleCrossAttention", maskattn.nn.LearnableScaleCrossAttention(8), (x, protos), {1}),
        ("SpatialAttentionPool", maskattn.nn.SpatialAttentionPool(4, 6), (img, img_mask), {1}),
    ]


MODULE_IDS = [m[0] for m in _modules("cpu")]


def _module(device, name):
    (entry,) = [m for m in _modules(device) if m[0] == name]
    _, mod, inputs, saved = entry
    return mod.to(device=device, dtype=DT), inputs, saved


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODULE_IDS)
def test_module_outputs_take_inplace_updates(name, device):
    mod, inputs, saved = _module(device, name)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            outs = _as_tuple(mod(*inputs))
            expected = [(y.detach() + 1) * 2 for y in outs]
            for y in outs:
                assert not y._is_view()
                y += 1
                y.mul_(2)
        for y, e in zip(outs, expected):
            torch.testing.assert_close(y.detach(), e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODULE_IDS)
def test_module_gradient_through_inplace_update(name, device):
    mod, inputs, saved = _module(device, name)
    first = _as_tuple(mod(*inputs))[0]
    bias = torch.randn(first.shape[-1], dtype=DT, device=device)
    y = _as_tuple(mod(*inputs))[0]
    y += bias
    (y**2).sum().backward()
    got = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    ((_as_tuple(mod(*inputs))[0] + bias) ** 2).sum().backward()
    for p, g in zip(mod.parameters(), got):
        torch.testing.assert_close(g, p.grad)
    assert any(g.abs().sum() > 0 for g in got)
    for i in saved:
        outs = _as_tuple(mod(*inputs))
        loss = (outs[0] ** 2).sum()
        outs[i].mul_(2)
        with pytest.raises(RuntimeError, match=SAVED):
            loss.backward()


@pytest.mark.parametrize("name", MODULE_IDS)
def test_module_inplace_update_compiled(name):
    mod, inputs, _ = _module("cpu", name)

    def step(*args):
        y = _as_tuple(mod(*args))[0]
        y += 0.5
        y.mul_(2)
        return y

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), step(*inputs))
