"""NaN and infinity behaviour of every op with a softmax or a reduction (docs/numerics.md):

* NaN in a valid logit poisons only its own bag / row (every other bag / row is finite and equal to
  the reference computed without it);
* -inf logits on valid positions take weight exactly 0; a bag / row whose valid logits are all -inf
  gets all-zero weights and output (like a fully masked one), where torch.softmax gives NaN;
* +inf logits behave as torch.softmax: the row's max is +inf, inf - inf = NaN, so the whole row
  (weights and output) is NaN;
* masked positions never leak: NaN / inf in padded logits, scores, features, keys or values change
  nothing, forward or backward, and the gradient reaching padded positions is exactly 0;
* fully masked rows give zeros and zero gradient.
"""

import math

import pytest
import torch
from reference_masked_attention_pool import reference_pool

import maskattn

NAN, INF = float("nan"), float("inf")
from conftest import DEVICES  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(a, b, dtype, what=""):
    torch.testing.assert_close(
        a.detach().double().cpu(),
        b.detach().double().cpu(),
        atol=TOL[dtype],
        rtol=TOL[dtype],
        msg=lambda m: f"{what}: {m}",
    )


def _grads(fn, inputs, gouts):
    """Run fn on fresh leaves of inputs, backprop gouts; (outputs, grads)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs], [g.to(o.dtype).to(o.device) for o, g in zip(outs, gouts)])
    return outs, [l.grad if l is not None and l.is_floating_point() else None for l in leaves]


# ------------------------------------------------------------------ masked_attention_pool (+ packed)


def _pool_inputs(dtype, device, K=None, B=4, N=9, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, N) if K is None else (B, N, K), generator=g).to(dtype).to(device)
    feats = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[:, 0] = True
    mask[:, -1] = False
    return logits, feats, mask.to(device)


def _pool_gouts(logits, feats, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, D = feats.shape[0], feats.shape[-1]
    pshape = (B, D) if logits.dim() == 2 else (B, logits.shape[-1], D)
    return [torch.randn(pshape, generator=g), torch.randn(logits.shape, generator=g)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [None, 3])
def test_pool_padding_content_never_leaks(device, dtype, K):
    logits, feats, mask = _pool_inputs(dtype, device, K)
    gouts = _pool_gouts(logits, feats)
    fn = lambda l, f: maskattn.masked_attention_pool(l, f, mask)  # noqa: E731
    (p0, w0), (gl0, gf0) = _grads(fn, [logits, feats], gouts)
    pad = ~mask
    for bad in (NAN, INF, -INF):
        l2, f2 = logits.clone(), feats.clone()
        l2[pad] = bad
        f2[pad] = bad
        (p, w), (gl, gf) = _grads(fn, [l2, f2], gouts)
        assert torch.equal(p, p0) and torch.equal(w, w0), bad
        assert torch.equal(gl, gl0) and torch.equal(gf, gf0), bad  # bit-identical gradients
        assert (gl[pad] == 0).all() and (gf[pad] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [None, 3])
def test_pool_nan_logit_poisons_only_its_bag(device, dtype, K):
    logits, feats, mask = _pool_inputs(dtype, device, K)
    gouts = _pool_gouts(logits, feats)
    l2 = logits.clone()
    if K is None:
        l2[1, 0] = NAN
    else:
        l2[1, 0, 2] = NAN  # branch 2 of bag 1 only
    fn = lambda l, f: maskattn.masked_attention_pool(l, f, mask)  # noqa: E731
    (p, w), (gl, gf) = _grads(fn, [l2, feats], gouts)
    (pr, wr), (glr, gfr) = _grads(lambda l, f: reference_pool(l, f, mask), [logits.double(), feats.double()], gouts)
    if K is None:
        assert p[1].isnan().all() and w[1][mask[1]].isnan().all()
        assert (w[1][~mask[1]] == 0).all()  # padding keeps weight 0 even in a poisoned bag
        others = [0, 2, 3]
        _close(p[others], pr[others], dtype, "pooled")
        _close(w[others], wr[others], dtype, "weights")
    else:
        assert p[1, 2].isnan().all() and w[1, :, 2][mask[1]].isnan().all()
        _close(p[1, :2], pr[1, :2], dtype, "pooled other branches")
        _close(w[1, :, :2], wr[1, :, :2], dtype, "weights other branches")
        others = [0, 2, 3]
        _close(p[others], pr[others], dtype, "pooled")
    _close(gl[others], glr[others], dtype, "grad logits")
    _close(gf[others], gfr[others], dtype, "grad features")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_neg_inf_logits_take_zero_weight(device, dtype):
    logits, feats, mask = _pool_inputs(dtype, device)
    gouts = _pool_gouts(logits, feats)
    l2, f2 = logits.clone(), feats.clone()
    l2[0, 0] = -INF  # one valid row of bag 0 at -inf
    l2[2][mask[2]] = -INF  # every valid row of bag 2 at -inf: zeros, like a fully masked bag
    fn = lambda l, f: maskattn.masked_attention_pool(l, f, mask)  # noqa: E731
    (p, w), (gl, gf) = _grads(fn, [l2, f2], gouts)
    ref_mask = mask.clone()
    ref_mask[0, 0] = False
    ref_mask[2] = False
    (pr, wr), (glr, gfr) = _grads(lambda l, f: reference_pool(l, f, ref_mask), [logits.double(), feats.double()], gouts)
    assert w[0, 0] == 0 and (w[2] == 0).all() and (p[2] == 0).all()
    _close(p, pr, dtype, "pooled")
    _close(w, wr, dtype, "weights")
    assert torch.isfinite(gl).all() and torch.isfinite(gf).all()
    _close(gl, glr, dtype, "grad logits")  # 0 at the -inf rows
    _close(gf, gfr, dtype, "grad features")  # 0 at the -inf rows
    # a zero-weight row's content is ignored like padding: NaN features there change nothing
    f3 = f2.clone()
    f3[0, 0] = NAN
    f3[2] = NAN
    (p3, w3), (gl3, gf3) = _grads(fn, [l2, f3], gouts)
    assert torch.equal(p3, p) and torch.equal(w3, w)
    assert torch.equal(gl3, gl) and torch.equal(gf3, gf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_pos_inf_logit_gives_nan_bag_like_torch_softmax(device, dtype):
    logits, feats, mask = _pool_inputs(dtype, device)
    l2 = logits.clone()
    l2[1, 0] = INF
    p, w = maskattn.masked_attention_pool(l2, feats, mask)
    # torch.softmax over the same valid logits: max = +inf, inf - inf = NaN -> the whole row is NaN
    ts = torch.softmax(l2[1][mask[1]].double(), 0)
    assert ts.isnan().all()
    assert w[1][mask[1]].isnan().all() and (w[1][~mask[1]] == 0).all() and p[1].isnan().all()
    assert torch.isfinite(p[[0, 2, 3]]).all() and torch.isfinite(w[[0, 2, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_fully_masked_bag_zeros_and_zero_grad(device, dtype):
    logits, feats, mask = _pool_inputs(dtype, device)
    mask = mask.clone()
    mask[3] = False
    l2, f2 = logits.clone(), feats.clone()
    l2[3], f2[3] = NAN, INF
    gouts = _pool_gouts(logits, feats)
    (p, w), (gl, gf) = _grads(lambda l, f: maskattn.masked_attention_pool(l, f, mask), [l2, f2], gouts)
    assert (p[3] == 0).all() and (w[3] == 0).all()
    assert (gl[3] == 0).all() and (gf[3] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_nan_poisons_only_its_bag_and_neg_inf(device, dtype):
    g = torch.Generator().manual_seed(3)
    lengths = [4, 0, 5, 3]
    offsets = torch.tensor([0] + lengths).cumsum(0).to(device)
    T = sum(lengths)
    logits = torch.randn(T, generator=g).to(dtype).to(device)
    feats = torch.randn(T, 5, generator=g).to(dtype).to(device)
    l2 = logits.clone()
    l2[5] = NAN  # bag 2
    l2[0] = -INF  # bag 0: one row at -inf
    l2[9:12] = -INF  # bag 3: every row at -inf -> zeros
    f2 = feats.clone()
    f2[0] = NAN  # content of a zero-weight row is ignored
    f2[9:12] = INF
    gp = torch.randn(4, 5, generator=g)
    gw = torch.randn(T, generator=g)
    (p, w), (gl, gf) = _grads(lambda l, f: maskattn.masked_attention_pool_packed(l, f, offsets), [l2, f2], [gp, gw])
    assert p[2].isnan().all() and w[4:9].isnan().all()
    assert (p[1] == 0).all() and (p[3] == 0).all() and (w[9:12] == 0).all() and w[0] == 0
    # bag 0 equals the softmax over its other rows
    ref_w = torch.softmax(logits[1:4].double(), 0)
    _close(w[1:4], ref_w, dtype, "bag 0 weights")
    _close(p[0], ref_w @ feats[1:4].double(), dtype, "bag 0 pooled")
    for rows in (slice(0, 4), slice(9, 12)):
        assert torch.isfinite(gl[rows]).all() and torch.isfinite(gf[rows]).all()
    assert gl[0] == 0 and (gf[0] == 0).all() and (gl[9:12] == 0).all() and (gf[9:12] == 0).all()


# ------------------------------------------------------------------ masked_softmax


def _softmax_ref(x, m, dim=-1):
    m = torch.broadcast_to(m, x.shape)
    z = torch.where(m, x.double(), -INF)
    z = torch.where(m.any(dim, keepdim=True), z, 0.0)
    return torch.where(m, torch.softmax(z, dim), 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [7, 300])  # a short row and one past the vector width / blocking
def test_masked_softmax_nonfinite(device, dtype, N):
    g = torch.Generator().manual_seed(N)
    x = (torch.randn(6, N, generator=g) * 2).to(dtype).to(device)
    m = torch.rand(6, N, generator=g) < 0.6
    m[:, 0] = True
    m[:, 1] = False
    m[5] = False  # a fully masked row
    m = m.to(device)
    go = torch.randn(6, N, generator=g)
    fn = lambda s: maskattn.masked_softmax(s, m)  # noqa: E731
    (y0,), (g0,) = _grads(fn, [x], [go])
    # padding content never leaks, forward or backward
    for bad in (NAN, INF, -INF):
        x2 = x.clone()
        x2[~m] = bad
        (y,), (gx,) = _grads(fn, [x2], [go])
        assert torch.equal(y, y0) and torch.equal(gx, g0), bad
        assert (gx[~m] == 0).all() and (y[5] == 0).all() and (gx[5] == 0).all()
    x2 = x.clone()
    x2[0, 0] = NAN  # row 0: poisoned
    x2[1, 0] = -INF  # row 1: one valid -inf -> weight 0
    x2[2][m[2]] = -INF  # row 2: all valid -inf -> zeros
    x2[3, 0] = INF  # row 3: +inf -> NaN row, as torch.softmax
    (y,), (gx,) = _grads(fn, [x2], [go])
    assert y[0][m[0]].isnan().all() and (y[0][~m[0]] == 0).all()
    assert y[1, 0] == 0 and (y[2] == 0).all() and (gx[2] == 0).all()
    assert torch.softmax(x2[3][m[3]].double(), 0).isnan().all()  # what torch does
    assert y[3][m[3]].isnan().all() and (y[3][~m[3]] == 0).all()
    m1 = m.clone()
    m1[1, 0] = False
    (yr,), (gr,) = _grads(lambda s: _softmax_ref(s, m1), [x.double()], [go])
    _close(y[1], yr[1], dtype, "row with a -inf")
    _close(gx[1], gr[1], dtype, "grad of the row with a -inf")
    assert gx[1, 0] == 0
    _close(y[4], y0[4], dtype, "untouched row")
    _close(gx[4], g0[4], dtype, "grad of the untouched row")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_nonfinite_broadcast_mask_and_inner_dim(device):
    # softmax over a non-last dim with a broadcast [B, 1, 1, N] key mask: NaN at padded keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(device)
    m = (torch.rand(2, 1, 1, 8, generator=g) < 0.5).to(device)
    m[..., 0] = True
    y0 = maskattn.masked_softmax(x, m, dim=-1)
    x2 = torch.where(m, x, NAN)
    assert torch.equal(maskattn.masked_softmax(x2, m, dim=-1), y0)
    mi = (torch.rand(2, 1, 5, 1, generator=g) < 0.5).to(device)
    y1 = maskattn.masked_softmax(x, mi, dim=2)
    assert torch.equal(maskattn.masked_softmax(torch.where(mi, x, INF), mi, dim=2), y1)


# ------------------------------------------------------------------ scaled_cross_attention


def _xattn(km, normalize):
    """scaled_cross_attention(q, k, v, s) with max_scale 100, key mask km."""
    return lambda q, k, v, s: maskattn.scaled_cross_attention(q, k, v, s, 100.0, km, normalize)


def _xattn_inputs(dtype, device, B=3, Lq=4, Lk=6, D=8, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Lk, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Lk, Dv, generator=g).to(dtype).to(device)
    km = torch.rand(B, Lk, generator=g) < 0.6
    km[:, 0] = True
    km[:, -1] = False
    km[2] = False  # sample 2: no valid key
    s = torch.tensor(math.log(10.0), device=device)
    gouts = [torch.randn(B, Lq, Dv, generator=g), torch.randn(B, Lq, Lk, generator=g)]
    return q, k, v, km.to(device), s, gouts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_xattn_masked_keys_never_leak(device, dtype, normalize):
    q, k, v, km, s, gouts = _xattn_inputs(dtype, device)
    fn = _xattn(km, normalize)
    (o0, a0), g0 = _grads(fn, [q, k, v, s], gouts)
    pad = ~km
    for bad in (NAN, INF, -INF):
        k2, v2 = k.clone(), v.clone()
        k2[pad] = bad
        v2[pad] = bad
        (o, a), gr = _grads(fn, [q, k2, v2, s], gouts)
        assert torch.equal(o, o0) and torch.equal(a, a0), bad
        for x, y, name in zip(gr, g0, "qkvs"):
            assert torch.equal(x, y), (bad, name)
        assert (gr[1][pad] == 0).all() and (gr[2][pad] == 0).all()
    # sample 2 has no valid key: zeros and zero gradient, even with NaN everywhere in its keys/values
    assert (o0[2] == 0).all() and (a0[2] == 0).all() and (g0[0][2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_xattn_nan_poisons_only_its_rows(device, dtype, normalize):
    q, k, v, km, s, gouts = _xattn_inputs(dtype, device)
    fn = _xattn(km, normalize)
    (o0, a0), g0 = _grads(fn, [q, k, v, s], gouts)
    q2 = q.clone()
    q2[0, 1, 3] = NAN  # query row (0, 1): its logits are NaN
    k2 = k.clone()
    k2[1, 0, 2] = NAN  # a valid key of sample 1: every query row of sample 1 is NaN
    (o, a), gr = _grads(lambda q, k, v: fn(q, k, v, s), [q2, k2, v], gouts)
    assert o[0, 1].isnan().all() and a[0, 1][km[0]].isnan().all() and (a[0, 1][~km[0]] == 0).all()
    assert o[1].isnan().all()
    rows = [(0, 0), (0, 2), (0, 3)]
    for b, i in rows:
        _close(o[b, i], o0[b, i], dtype, f"out row {b, i}")
        _close(a[b, i], a0[b, i], dtype, f"attn row {b, i}")
    assert (o[2] == 0).all() and (a[2] == 0).all()  # sample 2 (no valid key) stays zero
    # gradient: rows of sample 0 other than the NaN query row, and sample 2, are unaffected
    _close(gr[0][0, [0, 2, 3]], g0[0][0, [0, 2, 3]], dtype, "grad query")
    assert (gr[0][2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_xattn_neg_inf_logit_and_pos_inf(device, dtype):
    # without normalisation a key with a -inf component facing a positive query component gives a
    # -inf logit: weight 0 (content of that key's value ignored), as a masked key
    q, k, v, km, s, gouts = _xattn_inputs(dtype, device)
    km = torch.ones_like(km)
    q = q.abs()
    k2 = k.clone()
    k2[0, 2] = 0.0
    k2[0, 2, 0] = -INF
    v2 = v.clone()
    v2[0, 2] = NAN
    o, a = maskattn.scaled_cross_attention(q, k2, v2, s, 100.0, km, False)
    km2 = km.clone()
    km2[0, 2] = False
    orf, arf = maskattn.scaled_cross_attention(q, k, v, s, 100.0, km2, False)
    assert (a[0, :, 2] == 0).all()
    _close(o, orf, dtype, "out")
    _close(a, arf, dtype, "attn")
    # +inf logit: the row's softmax is NaN, as torch.softmax gives
    k3 = k.clone()
    k3[1, 2] = 0.0
    k3[1, 2, 0] = INF
    o, a = maskattn.scaled_cross_attention(q, k3, v, s, 100.0, km, False)
    assert a[1].isnan().all() and o[1].isnan().all()
    assert torch.isfinite(a[[0, 2]]).all() and torch.isfinite(o[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_xattn_infinite_logit_scale_is_clamped(device):
    # logit_scale_log = +inf: exp = inf, clamped to max_scale; its gradient is zero, not NaN
    q, k, v, km, _, gouts = _xattn_inputs(torch.float64, device)
    s = torch.tensor(INF, dtype=torch.float64, device=device)
    (o, a), gr = _grads(_xattn(km, True), [q, k, v, s], gouts)
    s100 = torch.tensor(math.log(100.0) + 1.0, dtype=torch.float64, device=device)
    (orf, arf), grf = _grads(_xattn(km, True), [q, k, v, s100], gouts)
    assert torch.equal(o, orf) and torch.equal(a, arf)
    assert gr[3] == 0 and all(torch.equal(x, y) for x, y in zip(gr[:3], grf[:3]))


# ------------------------------------------------------------------ gated_masked_mean


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_masked_mean_nonfinite(device, dtype):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 4, 3, 5, 6
    f = torch.randn(B, C, H, W, generator=g).to(dtype).to(device)
    gl = torch.randn(B, 1, H, W, generator=g).to(dtype).to(device)
    m = torch.rand(B, H, W, generator=g) < 0.6
    m[:, 0, 0] = True
    m[:, -1, -1] = False
    m[3] = False  # sample 3 fully masked
    m = m.to(device)
    gouts = [torch.randn(B, C, generator=g), torch.randn(B, 1, H, W, generator=g)]
    fn = lambda f, l: maskattn.gated_masked_mean(f, l, m)  # noqa: E731
    (p0, gt0), (gf0, gl0) = _grads(fn, [f, gl], gouts)
    pad = ~m
    for bad in (NAN, INF, -INF):
        f2, l2 = f.clone(), gl.clone()
        f2.permute(0, 2, 3, 1)[pad] = bad
        l2[:, 0][pad] = bad
        (p, gt), (gf, glg) = _grads(fn, [f2, l2], gouts)
        # float32 planes whose padding holds inf/NaN take a select-based sum (the plain dot would
        # give NaN): same value, but without the plain dot's FMA contraction - a few ulps apart
        ulp = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=0)
        torch.testing.assert_close(p, p0, **ulp)
        assert torch.equal(gt, gt0), bad
        assert torch.equal(gf, gf0) and torch.equal(glg, gl0), bad
        assert (gf.permute(0, 2, 3, 1)[pad] == 0).all() and (glg[:, 0][pad] == 0).all()
    assert (p0[3] == 0).all() and (gf0[3] == 0).all() and (gl0[3] == 0).all()
    # NaN feature at a valid pixel: only that (sample, channel) is NaN
    f2 = f.clone()
    f2[0, 1, 0, 0] = NAN
    (p, _), (gf, glg) = _grads(fn, [f2, gl], gouts)
    assert p[0, 1].isnan() and torch.isfinite(p[0, [0, 2]]).all() and torch.equal(p[1:], p0[1:])
    assert torch.equal(gf[1:], gf0[1:]) and torch.equal(glg[1:], gl0[1:])
    # NaN gate logit at a valid pixel: that sample's pooled row is NaN, nothing else
    l2 = gl.clone()
    l2[1, 0, 0, 0] = NAN
    (p, gt), (gf, glg) = _grads(fn, [f, l2], gouts)
    assert p[1].isnan().all() and gt[1, 0, 0, 0].isnan()
    assert torch.equal(p[[0, 2, 3]], p0[[0, 2, 3]]) and torch.equal(gf[[0, 2, 3]], gf0[[0, 2, 3]])
    # -inf / +inf gate logits: gate 0 / 1 (sigmoid), the pixel still counts in the mean
    l2 = gl.clone()
    l2[0, 0, 0, 0] = -INF
    l2[2, 0, 0, 0] = INF
    (p, gt), (gf, glg) = _grads(fn, [f, l2], gouts)
    assert gt[0, 0, 0, 0] == 0 and gt[2, 0, 0, 0] == 1
    assert torch.isfinite(p).all() and torch.isfinite(gf).all() and torch.isfinite(glg).all()
    assert glg[0, 0, 0, 0] == 0 and glg[2, 0, 0, 0] == 0  # sigmoid' = 0 at +-inf
    n = m.sum((1, 2)).clamp_min(1).to(torch.float64).cpu()
    gate = torch.sigmoid(l2.double().cpu()) * m.cpu()[:, None]
    ref = (f.double().cpu() * gate).sum((2, 3)) / n[:, None]
    _close(p, ref, dtype, "pooled with +-inf gates")


# ------------------------------------------------------------------ modules


def _padded_tokens(device, N, D):
    """[3, N, D] float64 tokens and their mask: token 0 valid, the last one padding, sample 2 empty."""
    x = torch.randn(3, N, D, dtype=torch.float64, device=device)
    m = torch.rand(3, N) < 0.6
    m[:, 0] = True
    m[:, -1] = False
    m[2] = False
    return x, m.to(device)


def _module_run(mod, x, fn):
    """fn(leaf copy of x) -> (outputs, loss); backprops loss: (outputs, grad x, parameter grads)."""
    mod.zero_grad()
    xx = x.clone().requires_grad_()
    outs, loss = fn(xx)
    loss.backward()
    return outs, xx.grad, [p.grad.clone() for p in mod.parameters()]


def _with_bad_padding(x, m):
    for bad in (NAN, INF, -INF):
        x2 = x.clone()
        x2[~m] = bad
        yield bad, x2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_self_attention_padding_content_never_leaks(device, need_weights):
    torch.manual_seed(0)
    mod = maskattn.nn.MaskedSelfAttention(16, num_heads=4).to(device).double()
    x, m = _padded_tokens(device, 7, 16)

    def fn(xx):
        y = mod(xx, mask=m, need_weights=need_weights)
        y = y[0] if need_weights else y
        return y, y.square().sum()

    y0, gx0, gp0 = _module_run(mod, x, fn)
    for bad, x2 in _with_bad_padding(x, m):
        y, gx, gp = _module_run(mod, x2, fn)
        torch.testing.assert_close(y, y0, rtol=0, atol=1e-12)
        torch.testing.assert_close(gx, gx0, rtol=0, atol=1e-12)
        assert all(torch.isfinite(a).all() for a in gp), bad
        for a, b in zip(gp, gp0):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert (gx[~m] == 0).all() and (y[~m] == 0).all()
    # NaN in a valid token poisons its own sample only
    x2 = x.clone()
    x2[0, 0, 3] = NAN
    y = mod(x2, mask=m)
    assert y[0][m[0]].isnan().all() and (y[0][~m[0]] == 0).all()
    torch.testing.assert_close(y[1:], y0[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("branches", [1, 2])
def test_attention_pooling_padding_content_never_leaks(device, gated, branches):
    torch.manual_seed(0)
    mod = maskattn.nn.AttentionPooling(12, hidden_dim=8, gated=gated, branches=branches).to(device).double()
    x, m = _padded_tokens(device, 9, 12)

    def fn(xx):
        p, w = mod(xx, m)
        return (p, w), p.square().sum() + w.sum()

    (p0, w0), gx0, gp0 = _module_run(mod, x, fn)
    for bad, x2 in _with_bad_padding(x, m):
        (p, w), gx, gp = _module_run(mod, x2, fn)
        assert torch.equal(p, p0) and torch.equal(w, w0), bad
        torch.testing.assert_close(gx, gx0, rtol=0, atol=1e-12)
        assert (gx[~m] == 0).all()
        for a, b in zip(gp, gp0):  # parameter gradients: padded rows contribute nothing
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (p0[2] == 0).all() and (w0[2] == 0).all()
    # NaN in a valid instance: only its bag
    x2 = x.clone()
    x2[1, 0, 0] = NAN
    p, w = mod(x2, m)
    assert p[1].isnan().all() and torch.equal(p[[0, 2]], p0[[0, 2]])


# ------------------------------------------------------------------ rows whose valid logits are all NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_nan_rows_are_nan_not_empty(device, dtype):
    # max over NaNs must not look like "no valid position" (max = -inf), which would give zeros
    logits, feats, mask = _pool_inputs(dtype, device)
    l2 = logits.clone()
    l2[1][mask[1]] = NAN
    l2[2][mask[2]] = -INF
    l2[2, 0] = NAN  # NaN among -inf
    p, w = maskattn.masked_attention_pool(l2, feats, mask)
    for b in (1, 2):
        assert w[b][mask[b]].isnan().all() and (w[b][~mask[b]] == 0).all() and p[b].isnan().all()
    assert torch.isfinite(p[[0, 3]]).all()
    x = torch.randn(3, 40).to(dtype).to(device)
    m = (torch.arange(40) % 3 != 0).expand(3, 40).to(device)
    x[1][m[1]] = NAN
    y = maskattn.masked_softmax(x, m)
    assert y[1][m[1]].isnan().all() and (y[1][~m[1]] == 0).all()
    assert torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_xattn_nan_logit_scale_poisons_everything(device):
    q, k, v, km, _, _ = _xattn_inputs(torch.float32, device)
    o, a = maskattn.scaled_cross_attention(q, k, v, torch.tensor(NAN, device=device), 100.0, km, True)
    has_key = km.any(1)
    assert o[has_key].isnan().all() and a[has_key][km[has_key].unsqueeze(1).expand(-1, q.shape[1], -1)].isnan().all()
    assert (o[~has_key] == 0).all() and (a[~has_key] == 0).all()  # no valid key: still zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("Lk", [6, 20, 80])  # CPU: one-pass rows, GEMM, GEMM; CUDA: rows, rows, GEMM
@pytest.mark.parametrize("where", ["key", "value"])
def test_xattn_shared_keys_per_sample_mask_never_leak(device, dtype, normalize, Lk, where):
    # A shared key j masked for samples 0 and 2 but valid for sample 1: whatever it holds reaches
    # sample 1 only. Samples 0 and 2 (outputs, weights, query gradients) must equal the finite run.
    g = torch.Generator().manual_seed(3)
    B, Lq, D, Dv, j = 3, 4, 8, 5, 2
    q = torch.randn(B, Lq, D, generator=g).to(dtype).to(device)
    k = torch.randn(Lk, D, generator=g).to(dtype).to(device)
    v = torch.randn(Lk, Dv, generator=g).to(dtype).to(device)
    km = torch.rand(B, Lk, generator=g) < 0.7
    km[:, 0] = True
    km[:, j] = torch.tensor([False, True, False])
    km = km.to(device)
    s = torch.tensor(math.log(10.0), device=device)
    gouts = [torch.randn(B, Lq, Dv, generator=g), torch.randn(B, Lq, Lk, generator=g)]
    fn = _xattn(km, normalize)
    (o0, a0), g0 = _grads(fn, [q, k, v, s], gouts)
    for bad in (NAN, INF, -INF):
        k2, v2 = k.clone(), v.clone()
        (k2 if where == "key" else v2)[j] = bad
        (o, a), gr = _grads(fn, [q, k2, v2, s], gouts)
        # (equal up to rounding: the fix may run these samples through a batched GEMM)
        for b in (0, 2):
            _close(o[b], o0[b], dtype, f"{bad}: out of sample {b}")
            _close(a[b], a0[b], dtype, f"{bad}: attn of sample {b}")
            _close(gr[0][b], g0[0][b], dtype, f"{bad}: grad query of sample {b}")
        assert not torch.isfinite(o[1]).all(), bad  # sample 1 weighs key j: its rows are not finite
        if where == "value":
            # weights do not depend on the values, so neither does grad_value (sample 1's too)
            _close(a, a0, dtype, f"{bad}: attn")
            _close(gr[2], g0[2], dtype, f"{bad}: grad value")
            # keys masked for sample 1 get nothing from its poisoned rows
            only_0_2 = ~km[1]
            only_0_2[j] = False
            assert torch.isfinite(gr[1][only_0_2]).all(), bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Lk", [6, 80])
def test_xattn_key_dead_for_one_row_and_poisoning_another(device, dtype, Lk):
    # key 2 of sample 0 holds +inf in feature 0: query rows with a positive feature 0 get a +inf
    # logit (poisoned, NaN), row (0, 1) has a negative one and gets -inf (weight 0). Row (0, 1) must
    # come out as if the key were masked, forward and grad_query: the key's inf must not reach it
    # through 0 * inf in grad_query = sum_j wqk_j k_j.
    q, k, v, _, s, gouts = _xattn_inputs(dtype, device, Lk=Lk)
    km = torch.ones(q.shape[0], Lk, dtype=torch.bool, device=device)
    q = q.abs()
    q[0, 1, 0] = -q[0, 1, 0]
    k2 = k.clone()
    k2[0, 2] = 0.0
    k2[0, 2, 0] = INF
    fn = _xattn(km, False)
    (o, a), gr = _grads(fn, [q, k2, v, s], gouts)
    km2 = km.clone()
    km2[0, 2] = False
    (orf, arf), grf = _grads(_xattn(km2, False), [q, k, v, s], gouts)
    assert o[0, 0].isnan().all() and (a[0, 1, 2] == 0)
    _close(o[0, 1], orf[0, 1], dtype, "out of the row that does not weigh the key")
    _close(a[0, 1], arf[0, 1], dtype, "attn of that row")
    _close(gr[0][0, 1], grf[0][0, 1], dtype, "grad query of that row")
    _close(o[1:], orf[1:], dtype, "other samples")
    _close(gr[0][1:], grf[0][1:], dtype, "grad query of other samples")
