"""The fused op torch.ops.maskattn.gated_attention_scores (+ its backward): CLAM's gated attention
scoring head after its two input Linear layers."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from reference_gated_attention_scores import reference_gated_attention_scores as ref
from reference_mil_peers import ClamAttnNetGated

import maskattn

op = maskattn.gated_attention_scores
_bwd = torch.ops.maskattn._gated_attention_scores_backward


def bwd(grad, v, u, w, act, output_mask, v_bias=None, u_bias=None):
    """The backward op; without hidden biases its first four outputs (their gradients are the
    row sums of the first two, checked in test_hidden_biases)."""
    if v_bias is None and u_bias is None:
        return _bwd(grad, v, u, w, act, None, None, list(output_mask) + [False, False])[:4]
    return _bwd(grad, v, u, w, act, v_bias, u_bias, output_mask)


ACTS = ("tanh", "relu", "gelu")

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
}


def _inputs(M=37, H=45, K=3, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    v, u = (torch.randn(M, H, generator=g, dtype=torch.float64) * scale for _ in range(2))
    w, b = torch.randn(K, H, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (v, u, w, b))


def _grads(f, args, g):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = f(*args)
    return out, torch.autograd.grad(out, args, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("biases_in_op", [False, True])
def test_matches_clam_gated_attention_net(device, dtype, biases_in_op):
    """The op in place of CLAM's Attn_Net_Gated: same scores, same parameter and input gradients,
    with the input layers' biases added by those layers or by the op."""
    torch.manual_seed(0)
    net = ClamAttnNetGated(L=64, D=48, n_classes=2).to(device=device, dtype=dtype)
    x = torch.randn(300, 64, device=device, dtype=dtype, requires_grad=True)
    a, _ = net(x)
    g = torch.randn_like(a)
    ref_grads = torch.autograd.grad(a, [x, *net.parameters()], g)
    c, la, lb = net.attention_c, net.attention_a[0], net.attention_b[0]
    if biases_in_op:
        s = op(F.linear(x, la.weight), F.linear(x, lb.weight), c.weight, c.bias, "tanh", la.bias, lb.bias)
    else:
        s = op(la(x), lb(x), c.weight, c.bias)
    grads = torch.autograd.grad(s, [x, *net.parameters()], g)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, a, **tol)
    for r, o in zip(ref_grads, grads):
        torch.testing.assert_close(o, r, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("H", [1, 16, 45, 256])
def test_matches_reference_float32(device, act, K, H):
    """float32 against float64: every vector width's tail (H mod 16) and K's unrolling."""
    v, u, w, b = _inputs(M=67, H=H, K=K)
    g = torch.randn(67, K, dtype=torch.float64)
    r, rg = _grads(lambda *a: ref(*a, act=act), (v, u, w, b), g)
    cv = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    o, og = _grads(lambda *a: op(*a, act=act), tuple(map(cv, (v, u, w, b))), cv(g))
    torch.testing.assert_close(o.double().cpu(), r, **TOL[torch.float32])
    for x, y in zip(og, rg):
        torch.testing.assert_close(x.double().cpu(), y, atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(act, bias):
    v, u, w, b = _inputs(M=6, H=5, K=2)
    if act == "relu":  # keep finite differences away from relu's kink
        v = v + torch.sign(v) * 0.1
    args = [v.requires_grad_(), u.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])

    def f(v, u, w, b=None):
        return op(v, u, w, b, act=act)

    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_strides(device):
    """[..., H] of any strides: halves of one [.., 2H] GEMM output, transposed leading dims, expanded
    rows, a non-unit last-dim stride; results equal those of contiguous copies."""
    g = torch.Generator().manual_seed(3)
    vu = torch.randn(4, 6, 2 * 24, generator=g).to(device)
    w, b = torch.randn(2, 24, generator=g).to(device), torch.randn(2, generator=g).to(device)
    cases = [
        (vu[..., :24], vu[..., 24:]),
        (vu[..., :24].transpose(0, 1), vu[..., 24:].transpose(0, 1)),
        (vu[:1, :1, :24].expand(4, 6, 24), vu[..., 24:]),
        (vu[..., ::2], vu[..., 1::2]),
    ]
    for v, u in cases:
        out = op(v, u, w, b)
        assert out.shape == v.shape[:-1] + (2,)
        assert out.is_contiguous()
        torch.testing.assert_close(out, op(v.contiguous(), u.contiguous(), w, b), atol=0, rtol=0)
        gr = torch.randn_like(out)
        a = bwd(gr, v, u, w, "tanh", [True] * 4)
        c = bwd(gr, v.contiguous(), u.contiguous(), w, "tanh", [True] * 4)
        for x, y in zip(a, c):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    v, u, w, b = _inputs(M=50, H=40, K=2, scale=1.0)
    g = torch.randn(50, 2, dtype=torch.float64)
    r, rg = _grads(ref, (v, u, w, b), g)
    cv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    o, og = _grads(op, tuple(map(cv, (v, u, w, b))), cv(g))
    assert o.dtype == dtype and all(x.dtype == dtype for x in og)
    # against float64 on inputs rounded to the dtype, so the tolerance covers the op, not the rounding
    r2, rg2 = _grads(ref, tuple(cv(t).double().cpu() for t in (v, u, w, b)), cv(g).double().cpu())
    torch.testing.assert_close(o.double().cpu(), r2, **TOL[dtype])
    for x, y in zip(og, rg2):
        scale = y.abs().max().clamp_min(1)
        torch.testing.assert_close(x.double().cpu() / scale, y / scale, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_the_autocast_dtype(device):
    v, u, w, b = (t.float().to(device) for t in _inputs(M=20, H=16, K=1))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = op(v, u, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), op(*(t.bfloat16() for t in (v, u, w, b))).float(), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_follow_the_layers_they_replace(device):
    """Saturating arguments give the activations' limits (no NaN from inf / inf); NaN propagates
    to its own row only, as in the unfused layers."""
    v, u, w, b = (t.float().to(device) for t in _inputs(M=8, H=20, K=2))
    inf, nan = float("inf"), float("nan")
    v[0, 0], u[1, 3], u[2, 5], v[3, 7], v[4, 1] = inf, -inf, inf, -inf, 1e30
    u[5, 2] = -1e30
    v[6, 4] = nan
    u[7, 9] = nan
    for act in ACTS:
        out = op(v, u, w, b, act=act)
        r = ref(*(t.double() for t in (v, u, w, b)), act=act).float()
        torch.testing.assert_close(out, r, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert out[6].isnan().all() and out[7].isnan().all()
        if act == "tanh":  # relu and gelu pass an infinite v on, as torch's do (the reference agrees)
            assert out[:6].isfinite().all()


def test_saturating_arguments_are_accurate():
    """Large |v| and |u|, where tanh / sigmoid round to their limits, and the small-|v| range where
    tanh must not cancel: within a few float32 ulps of float64, one hidden unit per row (so the
    score is act(v) * sigmoid(u) itself)."""
    x = (
        torch.cat(
            [
                torch.linspace(-100, 100, 4001, dtype=torch.float64),
                torch.linspace(-0.7, 0.7, 4001, dtype=torch.float64),
                torch.tensor([1e-30, -1e-30, 0.0, 88.5, -88.5, 89.5, -89.5], dtype=torch.float64),
            ]
        )
        .float()
        .double()
    )  # values float32 holds exactly
    col = x[:, None]
    w = torch.ones(1, 1, dtype=torch.float64)
    sat = torch.full_like(col, 200.0)  # sigmoid(200) = 1 in float32 and float64
    for act in ACTS:
        got = op(col.float(), sat.float(), w.float(), act=act).double()
        want = ref(col, sat, w, act=act)
        if act == "gelu":
            # erf's vectorised approximation (abs error 1.5e-7, as torch's own float32 erf): no
            # less accurate than torch's float32 gelu on the same points
            bound = (F.gelu(col.float()).double() - want).abs().max()
            assert (got - want).abs().max() <= bound, ((got - want).abs().max(), bound)
        else:  # tanh near 0 must hold its relative accuracy
            torch.testing.assert_close(got, want, atol=1e-37, rtol=4e-7)
    got = op(torch.ones_like(col).float() * 10, col.float(), w.float(), act="relu").double()
    torch.testing.assert_close(got, 10 * torch.sigmoid(col), atol=1e-37, rtol=4e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_are_independent(device):
    """Padding invariance at the op level: what sits in other rows (inf, NaN, anything) never
    reaches a row's score or its gradients; the weight gradient of zero-grad rows is zero."""
    v, u, w, b = (t.float().to(device) for t in _inputs(M=30, H=33, K=2))
    out = op(v, u, w, b)
    v2, u2 = v.clone(), u.clone()
    v2[10:], u2[10:] = float("nan"), float("inf")
    torch.testing.assert_close(op(v2, u2, w, b)[:10], out[:10], atol=0, rtol=0)
    g = torch.randn_like(out)
    g[10:] = 0
    a = bwd(g, v, u, w, "tanh", [True] * 4)
    c = bwd(g[:10], v[:10], u[:10], w, "tanh", [True] * 4)
    torch.testing.assert_close(a[0][:10], c[0], atol=0, rtol=0)
    torch.testing.assert_close(a[2], c[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[3], c[3], atol=1e-6, rtol=1e-6)


def test_parameter_gradients_do_not_depend_on_the_thread_count():
    v, u, w, b = (t.float() for t in _inputs(M=20000, H=64, K=2))
    g = torch.randn(20000, 2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _bwd(g, v, u, w, "tanh", v[0], u[1], [True] * 6)
        torch.set_num_threads(2)
        two = _bwd(g, v, u, w, "tanh", v[0], u[1], [True] * 6)
    finally:
        torch.set_num_threads(old)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_long_weight_gradient_sum_is_accurate():
    """grad_weight sums a million rows: blocked and added pairwise, the error within 1e-7 of the
    sum of the terms' magnitudes (a running float32 sum would be ~1e-4 off)."""
    M = 1_000_000
    g = torch.Generator().manual_seed(5)
    v, u = torch.randn(M, 4, generator=g), torch.randn(M, 4, generator=g)
    w = torch.randn(1, 4, generator=g)
    gr = torch.rand(M, 1, generator=g)
    _, _, gw, gb, gvb, gub = _bwd(gr, v, u, w, "tanh", None, None, [False, False, True, True, True, True])
    p = torch.tanh(v.double()) * torch.sigmoid(u.double())
    exact, size = gr.double().T @ p, gr.double().abs().T @ p.abs()
    assert ((gw.double() - exact).abs() <= 1e-7 * size).all(), (gw, exact)
    s = torch.sigmoid(u.double())
    gv = gr.double() * w.double() * s * (1 - torch.tanh(v.double()) ** 2)
    exact, size = gv.sum(0), gv.abs().sum(0)
    assert ((gvb.double() - exact).abs() <= 1e-7 * size).all(), (gvb, exact)
    torch.testing.assert_close(gb.double(), gr.double().sum(0), atol=0, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device):
    v, u, w, b = (t.float().to(device) for t in _inputs(M=5, H=4, K=2))
    assert op(v[:0], u[:0], w, b).shape == (0, 2)
    assert op(v, u, w[:0], b[:0]).shape == (5, 0)
    torch.testing.assert_close(op(v[:, :0], u[:, :0], w[:, :0], b), b.expand(5, 2))
    gv, gu, gw, gb = bwd(torch.ones(5, 2, device=device), v[:, :0], u[:, :0], w[:, :0], "tanh", [True] * 4)
    assert gv.shape == (5, 0) and gw.shape == (2, 0)
    torch.testing.assert_close(gb, torch.full((2,), 5.0, device=device))
    gv, gu, gw, gb = bwd(torch.ones(0, 2, device=device), v[:0], u[:0], w, "tanh", [True] * 4)
    assert gv.shape == (0, 4)
    torch.testing.assert_close(gw, torch.zeros(2, 4, device=device))
    torch.testing.assert_close(gb, torch.zeros(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    v, u, w, b = (t.float().to(device) for t in _inputs(M=40, H=32, K=2))
    lin_v, lin_u = torch.nn.Linear(16, 32).to(device), torch.nn.Linear(16, 32).to(device)
    x = torch.randn(40, 16, device=device)

    def head(x, w, b):
        return op(lin_v(x), lin_u(x), w, b, act="gelu").softmax(0)

    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    eager = head(x, wr, br)
    ge = torch.autograd.grad(eager.square().sum(), [wr, br, lin_v.weight])
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(x, wr, br)
    gc = torch.autograd.grad(out.square().sum(), [wr, br, lin_v.weight])
    torch.testing.assert_close(out, eager)
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


def test_vmap_per_example_gradients():
    """torch.func: per-example parameter gradients are each example's own sum, not the batch's."""
    v, u, w, b = _inputs(M=12, H=6, K=2)
    V = v.reshape(3, 4, 6)
    U = u.reshape(3, 4, 6)

    def loss(w, b, v, u):
        return op(v, u, w, b).tanh().sum()

    per = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, V, U)
    for i in range(3):
        one = torch.func.grad(lambda w, b: ref(V[i], U[i], w, b).tanh().sum(), argnums=(0, 1))(w, b)
        torch.testing.assert_close(per[0][i], one[0])
        torch.testing.assert_close(per[1][i], one[1])
    # batched parameters (an ensemble of heads)
    W = torch.randn(3, 2, 6, dtype=torch.float64)
    out = torch.func.vmap(lambda w, v, u: op(v, u, w, b))(W, V, U)
    torch.testing.assert_close(out, torch.stack([ref(V[i], U[i], W[i], b) for i in range(3)]))


def test_module_uses_it_and_matches_the_unfused_layers():
    """AttentionPooling(gated=True) scores with the fused op (no activation tensors saved) and
    gives CLAM's gradients; with dropout active in training it keeps the unfused layers."""
    torch.manual_seed(0)
    net = ClamAttnNetGated(L=32, D=24).double()
    pool = maskattn.nn.AttentionPooling.from_clam(net)
    x = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    a, _ = net(x)
    ref_pooled = F.softmax(a.T, 1) @ x
    pooled, _ = pool(x)
    g = torch.randn_like(pooled)
    r = torch.autograd.grad(ref_pooled.squeeze(0), [x, *net.parameters()], g)
    o = torch.autograd.grad(pooled, [x, *pool.parameters()], g)
    for p, q in zip(r, o):
        torch.testing.assert_close(q, p)
    # the autograd graph holds the fused op's node, not tanh / sigmoid / mul
    names = set()
    stack = [pool.scores(x).grad_fn]
    while stack:
        n = stack.pop()
        if n is not None and n.name() not in names:
            names.add(n.name())
            stack.extend(f for f, _ in n.next_functions)
    assert any("gated_attention_scores" in n for n in names), names
    assert not any(n.startswith(("TanhBackward", "SigmoidBackward")) for n in names), names
    drop = maskattn.nn.AttentionPooling(32, 24, gated=True, dropout=0.5).double().train()
    torch.manual_seed(1)
    s1 = drop.scores(x)
    torch.manual_seed(1)
    s2 = drop.attention_w(drop.attention_v(x) * drop.attention_u(x)).squeeze(-1)
    torch.testing.assert_close(s1, s2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_gradient_is_torchs_select(device, dtype):
    """relu's gradient selects like torch's threshold_backward: 0 at v <= 0 even when the incoming
    gradient is infinite, and passed on at NaN v."""
    nan, inf = float("nan"), float("inf")
    v = torch.tensor([[nan, -1.0, 2.0, 0.0, 3.0]], dtype=dtype, device=device)
    u = torch.tensor([[0.0, 0.5, -1.0, 2.0, 1.0]], dtype=dtype, device=device)
    w = torch.tensor([[1.0, inf, 2.0, inf, -1.0]], dtype=dtype, device=device)
    g = torch.ones(1, 1, dtype=dtype, device=device)
    got = bwd(g, v, u, w, "relu", [True, False, False, False])[0]
    vr = v.clone().requires_grad_()
    (torch.relu(vr) * torch.sigmoid(u) * w).sum().backward()
    torch.testing.assert_close(got, vr.grad, equal_nan=True)
    assert got[0, 0] == torch.sigmoid(u[0, 0]) and got[0, 1] == 0 and got[0, 3] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
def test_hidden_biases(device, act):
    """v_bias / u_bias are the input layers' biases: the op with them equals the op on
    v_pre + v_bias, u_pre + u_bias, and their gradients are the row sums of grad_v / grad_u, asked
    for alone or together, in every dtype."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        v, u, w, b = (t.to(device=device, dtype=dtype) for t in _inputs(M=300, H=40, K=2))
        bv, bu = v[0] * 0.5, u[1] * 0.5
        # the sums v_pre + v_bias are formed in float64 for the comparison: the op adds in its
        # accumulation dtype, where adding in bfloat16 first would round them
        d = [t.double() for t in (v, u, w, b, bv, bu)]
        torch.testing.assert_close(
            op(v, u, w, b, act, bv, bu).double(), op(d[0] + d[4], d[1] + d[5], d[2], d[3], act), **TOL[dtype]
        )
        g = torch.randn(300, 2, device=device, dtype=dtype)
        full = _bwd(g, v, u, w, act, bv, bu, [True] * 6)
        plain = _bwd(g.double(), d[0] + d[4], d[1] + d[5], d[2], act, None, None, [True] * 4 + [False] * 2)
        for x, y in zip(full[:4], plain[:4]):
            scale = y.abs().max().clamp_min(1)
            torch.testing.assert_close(x.double() / scale, y / scale, **TOL[dtype])
        sums = TOL[dtype] if dtype != torch.bfloat16 else dict(atol=0.5, rtol=2e-2)
        torch.testing.assert_close(full[4].double(), full[0].double().sum(0), **sums)
        torch.testing.assert_close(full[5].double(), full[1].double().sum(0), **sums)
        only = _bwd(g, v, u, w, act, bv, bu, [False] * 4 + [True] * 2)
        assert only[0].numel() == 0 and only[1].numel() == 0
        assert torch.equal(only[4], full[4]) and torch.equal(only[5], full[5])
