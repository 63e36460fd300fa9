"""masked_channel_attention_pool(_packed): PyG's feature-level gate (one softmax per bag and
channel) against float64 references, gradcheck, opcheck, torch.compile, padding invariance, mask
dtypes, strides, low precision, empty bags, non-finite rules, frozen features, determinism across
thread counts, and parity with torch_geometric's AttentionalAggregation when it is installed."""

import pytest
import torch
from conftest import DEVICES
from reference_masked_channel_attention_pool import (
    pyg_attentional_aggregation,
    reference_channel_pool,
    reference_channel_pool_packed,
)

import maskattn

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}
NAN, INF = float("nan"), float("inf")
pool = maskattn.masked_channel_attention_pool
packed = maskattn.masked_channel_attention_pool_packed


def make(B, N, D, dtype=torch.float32, device="cpu", p_valid=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, N, D, generator=g) * 2).to(device=device, dtype=dtype)
    feats = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    mask = torch.rand(B, N, generator=g) < p_valid
    if N:
        mask[:, 0] = True  # no empty bag unless a test asks for one
    return logits, feats, mask.to(device)


def make_packed(lengths, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    logits = (torch.randn(T, D, generator=g) * 2).to(device=device, dtype=dtype)
    feats = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    offsets = torch.tensor([0] + list(lengths)).cumsum(0).to(device)
    return logits, feats, offsets


def close(a, b, tol, msg=""):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=tol, rtol=tol, msg=lambda m: f"{msg}: {m}")


def grads(fn, inputs, gouts):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(list(outs), [g.to(o.dtype).to(o.device) for o, g in zip(outs, gouts)])
    return outs, [x.grad for x in leaves]


def gouts_for(B, rows_shape, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, D, generator=g, dtype=torch.float64),
        torch.randn(rows_shape, generator=g, dtype=torch.float64),
    ]


# ---------------------------------------------------------------- against the float64 reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(37, 20), (300, 133), (5, 1)])
def test_forward_backward_against_reference(device, dtype, N, D):
    B = 3
    logits, feats, mask = make(B, N, D, dtype, device)
    mask[2] = False  # one empty bag
    gouts = gouts_for(B, (B, N, D), D)
    (pooled, weights), (gl, gf) = grads(lambda l, f: pool(l, f, mask), [logits, feats], gouts)
    assert pooled.dtype == dtype and weights.dtype == dtype
    assert pooled.shape == (B, D) and weights.shape == (B, N, D)
    (pr, wr), (glr, gfr) = grads(
        lambda l, f: reference_channel_pool(l, f, mask), [logits.double(), feats.double()], gouts
    )
    close(pooled, pr, TOL[dtype], "pooled")
    close(weights, wr, TOL[dtype], "weights")
    close(gl, glr, GTOL[dtype], "grad logits")
    close(gf, gfr, GTOL[dtype], "grad features")
    pad = ~mask
    assert (weights[pad] == 0).all() and (gl[pad] == 0).all() and (gf[pad] == 0).all()
    assert (pooled[2] == 0).all()
    # each channel's weights sum to 1 over the valid rows of a non-empty bag
    close(weights[:2].double().sum(1), torch.ones(2, D, dtype=torch.float64), 2 * TOL[dtype], "weights sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_against_reference_and_padded(device, dtype):
    lengths, D = [4, 0, 70, 1, 9000, 0], 19
    logits, feats, offsets = make_packed(lengths, D, dtype, device)
    B, T = len(lengths), sum(lengths)
    gouts = gouts_for(B, (T, D), D)
    (p, w), (gl, gf) = grads(lambda l, f: packed(l, f, offsets), [logits, feats], gouts)
    assert p.shape == (B, D) and w.shape == (T, D) and p.dtype == dtype
    (pr, wr), (glr, gfr) = grads(
        lambda l, f: reference_channel_pool_packed(l, f, offsets.cpu()),
        [logits.double().cpu(), feats.double().cpu()],
        gouts,
    )
    close(p, pr, TOL[dtype], "pooled")
    close(w, wr, TOL[dtype], "weights")
    close(gl, glr, GTOL[dtype], "grad logits")
    close(gf, gfr, GTOL[dtype], "grad features")
    assert (p[1] == 0).all() and (p[5] == 0).all()
    if dtype == torch.float64:  # the padded op over the same bags: the same numbers
        lp, mask = maskattn.unpack(logits, offsets)[0], maskattn.unpack(logits, offsets)[1]
        fp = maskattn.unpack(feats, offsets)[0]
        pp, wp = pool(lp, fp, mask)
        close(pp, p, 1e-12, "padded pooled")
        close(wp[mask], w, 1e-12, "padded weights")


@pytest.mark.parametrize("device", DEVICES)
def test_packed_batch_vector_like_pyg(device):
    logits, feats, offsets = make_packed([3, 0, 5], 4, torch.float64, device)
    batch = maskattn.batch_from_offsets(offsets)
    for got, want in zip(packed(logits, feats, batch=batch, num_bags=3), packed(logits, feats, offsets)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pass offsets or batch, not both"):
        packed(logits, feats, offsets, batch=batch)
    with pytest.raises(ValueError, match="offsets .* is required"):
        packed(logits, feats)
    with pytest.raises(ValueError, match="num_bags goes with batch="):
        packed(logits, feats, offsets, num_bags=3)


def test_pyg_math_in_plain_torch_matches():
    # the benchmark's baseline (PyG's scatter softmax) is the same function as the op
    logits, feats, offsets = make_packed([6, 1, 11], 5, torch.float64)
    batch = maskattn.batch_from_offsets(offsets)
    pr, wr = pyg_attentional_aggregation(logits, feats, batch, 3)
    p, w = packed(logits, feats, offsets)
    close(p, pr, 1e-12, "pooled")
    close(w, wr, 1e-12, "weights")


# ---------------------------------------------------------------- gradcheck / opcheck / compile


@pytest.mark.parametrize("layout", ["contiguous", "channels_first", "sliced", "transposed_logits"])
def test_gradcheck(layout):
    B, N, D = 3, 9, 5
    logits, feats, mask = make(B, N, D, torch.float64)
    mask[1] = False
    logits[0, 2, 1] = -INF  # a valid row of weight 0 in one channel
    if layout == "channels_first":
        lb, fb = logits, feats.transpose(1, 2).contiguous()

        def fn(l, f):
            return pool(l, f.transpose(1, 2), mask)
    elif layout == "sliced":
        lb, fb = logits, torch.randn(B, N, 2 * D, dtype=torch.float64)

        def fn(l, f):
            return pool(l, f[..., ::2], mask)
    elif layout == "transposed_logits":
        lb, fb = logits.transpose(0, 2).contiguous(), feats

        def fn(l, f):
            return pool(l.transpose(0, 2), f, mask)
    else:
        lb, fb = logits, feats

        def fn(l, f):
            return pool(l, f, mask)

    assert torch.autograd.gradcheck(fn, (lb.requires_grad_(), fb.requires_grad_()))


def test_gradcheck_packed():
    logits, feats, offsets = make_packed([4, 0, 7, 1], 6, torch.float64)
    logits[5, 2] = -INF
    assert torch.autograd.gradcheck(
        lambda l, f: packed(l, f, offsets), (logits.requires_grad_(), feats.requires_grad_())
    )
    assert torch.autograd.gradcheck(
        lambda l, f: packed(l, f.t(), offsets), (logits.detach(), feats.detach().t().contiguous().requires_grad_())
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    fwd = torch.ops.maskattn.masked_channel_attention_pool.default
    l, f, m = make(2, 7, 4, torch.float32, device)
    cases = [
        (l.requires_grad_(), f.requires_grad_(), m),
        (l.detach().requires_grad_(), f.detach(), m.to(torch.uint8)),  # frozen features
        (l.detach(), f.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), None),
    ]
    for args in cases:
        torch.library.opcheck(fwd, args)
    lp, fp, offs = make_packed([3, 0, 5], 5, torch.float32, device)
    torch.library.opcheck(
        torch.ops.maskattn.masked_channel_attention_pool_packed.default,
        (lp.requires_grad_(), fp.requires_grad_(), offs),
    )
    p, w = pool(l.detach(), f.detach(), m)
    bwd = torch.ops.maskattn._masked_channel_attention_pool_backward.default
    for gw in (None, torch.randn_like(w)):
        for om in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(bwd, (torch.randn_like(p), gw, p, w, f.detach(), om))
    pp, wp = packed(lp.detach(), fp.detach(), offs)
    bwdp = torch.ops.maskattn._masked_channel_attention_pool_packed_backward.default
    for gw in (None, torch.randn_like(wp)):
        for om in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(bwdp, (torch.randn_like(pp), gw, pp, wp, fp.detach(), offs, om))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_dynamic(device):
    from test_dynamic_compile import check_dynamic

    def fn(l, fcf, m, lp, fp, offs):
        p, w = pool(l, fcf.transpose(1, 2), m)  # channels-first features, transposed in the graph
        p2, w2 = packed(lp, fp, offs)
        return p, w, p2, w2

    def inputs(B, N, D, T):
        l, f, m = make(B, N, D, device=device, seed=B)
        fcf = f.transpose(1, 2).contiguous()
        lp, fp, offs = make_packed([T // 3, 0, T - T // 3], D, device=device, seed=T)
        return (l.requires_grad_(), fcf.requires_grad_(), m, lp.requires_grad_(), fp.requires_grad_(), offs)

    check_dynamic(fn, inputs, [(3, 11, 6, 13), (5, 17, 9, 20)])


def test_double_backward_raises():
    l, f, _ = make(2, 5, 3, torch.float64)
    l.requires_grad_()
    p, _ = pool(l, f)
    (gl,) = torch.autograd.grad(p.sum(), (l,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(gl.sum(), l)


# ---------------------------------------------------------------- padding, masks, strides


@pytest.mark.parametrize("device", DEVICES)
def test_padding_content_and_amount_change_nothing(device):
    B, N, D = 4, 30, 12
    logits, feats, mask = make(B, N, D, torch.float32, device)
    mask[3] = False
    outs = []
    for variant in ("zeros", "noise", "nan", "more_padding"):
        l, f, m = logits.clone(), feats.clone(), mask.clone()
        pad = ~m
        if variant == "noise":
            l[pad] = 1e4
            f[pad] = torch.randn_like(f[pad]) * 1e6
        elif variant == "nan":
            l[pad] = NAN
            f[pad] = INF
        elif variant == "more_padding":
            extra = 17
            l = torch.cat([l, torch.full_like(l[:, :extra], NAN)], 1)
            f = torch.cat([f, torch.full_like(f[:, :extra], NAN)], 1)
            m = torch.cat([m, torch.zeros_like(m[:, :extra])], 1)
        else:
            l[pad] = 0
            f[pad] = 0
        l.requires_grad_()
        f.requires_grad_()
        p, w = pool(l, f, m)
        (p.square().sum() + (w[:, :N] * torch.linspace(-1, 1, N, device=device)[:, None]).sum()).backward()
        outs.append((p, w[:, :N], l.grad[:, :N], f.grad[:, :N]))
        assert (w[:, N:] == 0).all() and (l.grad[:, N:] == 0).all() and (f.grad[:, N:] == 0).all()
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mdtype",
    [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16, torch.float64],
)
def test_mask_dtypes(device, mdtype):
    logits, feats, mask = make(2, 13, 6, device=device)
    ref = pool(logits, feats, mask)
    m = mask.to(mdtype) * (3 if mdtype != torch.bool else 1)  # any nonzero counts as valid
    if mdtype.is_floating_point:
        m = torch.where(mask, -0.5, 0.0).to(mdtype)  # negative is nonzero too
    for a, b in zip(pool(logits, feats, m), ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_mask_equals_all_valid_and_torch_softmax():
    logits, feats, _ = make(2, 9, 4)
    p, w = pool(logits, feats)
    torch.testing.assert_close(w, torch.softmax(logits, 1))
    torch.testing.assert_close(p, (w * feats).sum(1))
    p2, w2 = pool(logits, feats, torch.ones(2, 9, dtype=torch.bool))
    assert torch.equal(p, p2) and torch.equal(w, w2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(device, dtype):
    B, N, D = 3, 40, 24
    logits, feats, mask = make(B, N, D, dtype, device)
    gouts = gouts_for(B, (B, N, D), D)
    ref_out, ref_g = grads(lambda l, f: pool(l, f, mask), [logits, feats], gouts)
    variants = {
        "transposed logits": (logits.transpose(1, 2).contiguous().transpose(1, 2), feats, mask),
        "channels-first features": (logits, feats.transpose(1, 2).contiguous().transpose(1, 2), mask),
        "N-major": (
            logits.permute(1, 0, 2).contiguous().permute(1, 0, 2),
            feats.permute(1, 0, 2).contiguous().permute(1, 0, 2),
            mask,
        ),
        "sliced": (
            torch.stack([logits, logits], -1)[..., 0],
            torch.stack([feats, feats], -1)[..., 1],
            mask[:, None, :].expand(B, 2, N)[:, 0],
        ),
        "transposed mask": (logits, feats, mask.t().contiguous().t()),
        "expanded logits": (logits[:1].expand(B, N, D), feats, mask),
    }
    for name, (l, f, m) in variants.items():
        if name == "expanded logits":
            out = pool(l, f, m)
            want = pool(l.contiguous(), f, m)
            for a, b in zip(out, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
            continue
        ll, fl = l.detach().requires_grad_(), f.detach().requires_grad_()
        out = pool(ll, fl, m)
        torch.autograd.backward(list(out), [g.to(dtype).to(device) for g in gouts])
        assert all(o.is_contiguous() for o in out)
        for a, b in zip(list(out) + [ll.grad, fl.grad], list(ref_out) + ref_g):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accepts_any_strides(device):
    logits, feats, mask = make(2, 9, 6, torch.float64, device)
    p, w = pool(logits, feats, mask)
    gp, gw = torch.randn_like(p), torch.randn_like(w)
    bwd = torch.ops.maskattn._masked_channel_attention_pool_backward
    got = bwd(
        gp[:1].expand(2, 6),
        gw.transpose(1, 2).contiguous().transpose(1, 2),
        p.t().contiguous().t(),
        w.permute(1, 0, 2).contiguous().permute(1, 0, 2),
        feats.transpose(1, 2).contiguous().transpose(1, 2),
        [True, True],
    )
    want = bwd(gp[:1].expand(2, 6).contiguous(), gw, p, w, feats, [True, True])
    for a, b in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- empty bags, zero sizes


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_bag_and_all_neg_inf_channel_give_zeros_and_zero_grads(device):
    logits, feats, mask = make(3, 10, 4, torch.float32, device)
    mask[0] = False
    logits[0] = NAN  # padding content of the empty bag
    feats[0] = INF
    logits[1, :, 2] = -INF  # bag 1, channel 2: every valid logit -inf
    gouts = gouts_for(3, (3, 10, 4), 4)
    (p, w), (gl, gf) = grads(lambda l, f: pool(l, f, mask), [logits, feats], gouts)
    assert (p[0] == 0).all() and (w[0] == 0).all() and (gl[0] == 0).all() and (gf[0] == 0).all()
    assert p[1, 2] == 0 and (w[1, :, 2] == 0).all() and (gl[1, :, 2] == 0).all() and (gf[1, :, 2] == 0).all()
    assert torch.isfinite(p).all() and torch.isfinite(gl).all() and torch.isfinite(gf).all()
    assert (w[1, mask[1]][:, [0, 1, 3]] > 0).all()  # the other channels of bag 1 are untouched


@pytest.mark.parametrize("device", DEVICES)
def test_zero_sizes(device):
    for B, N, D in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        l = torch.randn(B, N, D, device=device, requires_grad=True)
        f = torch.randn(B, N, D, device=device, requires_grad=True)
        p, w = pool(l, f, torch.ones(B, N, dtype=torch.bool, device=device))
        assert p.shape == (B, D) and w.shape == (B, N, D)
        assert (p == 0).all()
        (p.sum() + w.sum()).backward()
        assert l.grad.shape == l.shape and f.grad.shape == f.shape
    for lengths, D in [([], 3), ([0, 0], 3), ([2, 3], 0)]:
        lp, fp, offs = make_packed(lengths, D, device=device)
        lp.requires_grad_()
        fp.requires_grad_()
        p, w = packed(lp, fp, offs)
        assert p.shape == (len(lengths), D) and w.shape == lp.shape and (p == 0).all()
        (p.sum() + w.sum()).backward()
        assert lp.grad.shape == lp.shape


# ---------------------------------------------------------------- non-finite rules (docs/numerics.md)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_logit_poisons_only_its_bag_and_channel(device, dtype):
    logits, feats, mask = make(3, 8, 5, dtype, device)
    l2 = logits.clone()
    l2[1, 0, 3] = NAN
    l2[1, 1, 3] = -INF
    p, w = pool(l2, feats, mask)
    assert w[1, mask[1], 3].isnan().all() and p[1, 3].isnan()  # as torch.softmax: the -inf row too
    assert (w[1, ~mask[1], 3] == 0).all()
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 3] = False
    pr, wr = reference_channel_pool(logits, feats, mask)
    close(p[keep], pr[keep], TOL[dtype], "other channels")
    close(w.transpose(1, 2)[keep], wr.transpose(1, 2)[keep], TOL[dtype], "other weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pos_inf_logit_gives_nan_channel_like_torch_softmax(device, dtype):
    logits, feats, mask = make(3, 8, 5, dtype, device)
    l2 = logits.clone()
    l2[2, 0, 1] = INF
    p, w = pool(l2, feats, mask)
    assert torch.softmax(l2[2, mask[2], 1].double(), 0).isnan().all()
    assert w[2, mask[2], 1].isnan().all() and (w[2, ~mask[2], 1] == 0).all() and p[2, 1].isnan()
    others = torch.ones_like(p, dtype=torch.bool)
    others[2, 1] = False
    assert torch.isfinite(p[others]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_logits_take_zero_weight_and_their_features_are_ignored(device, dtype):
    logits, feats, mask = make(2, 9, 4, dtype, device)
    l2, f2 = logits.clone(), feats.clone()
    l2[0, 1, 2] = -INF
    f2[0, 1, 2] = NAN  # only the weight-0 entry holds NaN
    f2[0, 1, 0] = f2[0, 1, 0]  # the row's other channels keep their values
    gouts = gouts_for(2, (2, 9, 4), 4)
    (p, w), (gl, gf) = grads(lambda l, f: pool(l, f, mask), [l2, f2], gouts)
    (pr, wr), (glr, gfr) = grads(lambda l, f: reference_channel_pool(l, f, mask), [l2.double(), f2.double()], gouts)
    assert w[0, 1, 2] == 0 and gl[0, 1, 2] == 0 and gf[0, 1, 2] == 0
    assert torch.isfinite(p).all() and torch.isfinite(gl).all() and torch.isfinite(gf).all()
    close(p, pr, TOL[dtype], "pooled")
    close(gl, glr, GTOL[dtype], "grad logits")
    close(gf, gfr, GTOL[dtype], "grad features")


@pytest.mark.parametrize("device", DEVICES)
def test_feature_nan_reaches_only_its_channel(device):
    logits, feats, mask = make(2, 9, 4, torch.float32, device)
    f2 = feats.clone()
    f2[1, 0, 3] = NAN  # a valid row with weight > 0
    p, _ = pool(logits, f2, mask)
    assert p[1, 3].isnan() and torch.isfinite(p[0]).all() and torch.isfinite(p[1, :3]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rows_whose_weight_underflows_are_never_read(device):
    # Channel 0: rows 0-63 at 0; rows 64-127 far below them. The second block of rows has its own
    # max (-100), so inside it row 70 (at -110) is not negligible, but its final weight, e^-110 /
    # sum, underflows float32 to exactly 0: its inf feature must not reach pooled.
    N, D = 128, 3
    logits = torch.zeros(1, N, D)
    feats = torch.ones(1, N, D)
    logits[0, 64:, 0] = -100.0
    logits[0, 70, 0] = -110.0
    feats[0, 70, 0] = INF
    logits, feats = logits.to(device), feats.to(device)
    p, w = pool(logits, feats)
    assert w[0, 70, 0] == 0
    assert torch.isfinite(p).all()
    clean = feats.clone()
    clean[0, 70, 0] = 1.0  # what float32 gives it: weight 0, so its value cannot matter
    pr, _ = reference_channel_pool(logits, clean)
    close(p, pr, 1e-6, "pooled")
    lp, fp = logits[0], feats[0]
    p2, _ = packed(lp, fp, torch.tensor([0, N], device=device))
    assert torch.isfinite(p2).all()


@pytest.mark.parametrize("device", DEVICES)
def test_keeps_subnormal_weights(device):
    logits = torch.zeros(1, 3, 9, device=device)
    logits[0, 1] = -95.0  # e^-95 / sum is subnormal in float32
    p, w = pool(logits, torch.ones(1, 3, 9, device=device))
    ref = torch.softmax(logits.double(), 1)
    assert (w[0, 1] > 0).all()
    torch.testing.assert_close(w.double(), ref.to(torch.float32).double(), atol=4 * 2.0**-149, rtol=0)


# ---------------------------------------------------------------- frozen features, saved tensors


def test_frozen_features_compute_no_feature_gradient():
    logits, feats, mask = make(2, 16, 8)
    p, w = pool(logits, feats, mask)
    gp = torch.randn(2, 8)
    bwd = torch.ops.maskattn._masked_channel_attention_pool_backward
    gl, gf = bwd(gp, None, p, w, feats, [True, False])
    assert gf.numel() == 0 and gl.shape == logits.shape
    gl2, gf2 = bwd(gp, None, p, w, feats, [True, True])
    torch.testing.assert_close(gl, gl2, atol=0, rtol=0)
    gl3, gf3 = bwd(gp, None, p, w, feats, [False, True])
    assert gl3.numel() == 0
    torch.testing.assert_close(gf3, gf2, atol=0, rtol=0)
    l = logits.clone().requires_grad_()
    p, w = pool(l, feats, mask)
    saved = p.grad_fn.saved_tensors
    # a copy of pooled, the weights and the features (not copied)
    assert len(saved) == 3 and saved[2].data_ptr() == feats.data_ptr()
    assert saved[0].data_ptr() != p.data_ptr() and torch.equal(saved[0], p)
    p.sum().backward()
    assert feats.grad is None and l.grad is not None


def test_result_does_not_depend_on_the_thread_count():
    logits, feats, offsets = make_packed([20000, 3, 9000], 150)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lp, fp = logits.clone().requires_grad_(), feats.clone().requires_grad_()
            p, w = packed(lp, fp, offsets)
            (p.square().sum() + w.square().sum()).backward()
            outs.append((p, w, lp.grad, fp.grad))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_low_precision(dtype):
    l, f, m = make(2, 9, 6)
    l.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        p, w = pool(l, f, m)
        lp, fp, offs = make_packed([4, 5], 6)
        p2, _ = packed(lp, fp, offs)
    assert p.dtype == dtype and w.dtype == dtype and p2.dtype == dtype
    pr, _ = reference_channel_pool(l.detach().to(dtype), f.to(dtype), m)
    close(p, pr, TOL[dtype], "pooled")
    p.float().sum().backward()
    assert l.grad.dtype == torch.float32 and torch.isfinite(l.grad).all()


# ---------------------------------------------------------------- torch_geometric parity (optional)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_geometric_attentional_aggregation(device):
    aggr = pytest.importorskip("torch_geometric.nn.aggr")
    torch.manual_seed(0)
    F = 7
    gate_nn = torch.nn.Linear(F, F).double().to(device)
    x = torch.randn(40, F, dtype=torch.float64, device=device)
    batch = torch.tensor([0] * 9 + [2] * 25 + [3] * 6, device=device)  # graph 1 and 4 have no node
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = aggr.AttentionalAggregation(gate_nn)(x1, batch, dim_size=5)
    ours, _ = packed(gate_nn(x2), x2, batch=batch, num_bags=5)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(ours)
    ga = torch.autograd.grad(theirs, [x1, *gate_nn.parameters()], g)
    gb = torch.autograd.grad(ours, [x2, *gate_nn.parameters()], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_ops_check_their_arguments(device):
    logits, feats, mask = make(2, 5, 3, torch.float32, device)
    p, w = pool(logits, feats, mask)
    gp = torch.randn_like(p)
    bwd = torch.ops.maskattn._masked_channel_attention_pool_backward
    name = "_masked_channel_attention_pool_backward"
    with pytest.raises(RuntimeError, match=rf"{name}: pooled has shape \[3, 2\], expected \[B, D\] = \[2, 3\]"):
        bwd(gp, None, p.t(), w, feats, [True, True])
    with pytest.raises(
        RuntimeError, match=rf"{name}: pooled \(Double\) and features \(Float\) must have the same dtype"
    ):
        bwd(gp, None, p.double(), w, feats, [True, True])
    with pytest.raises(RuntimeError, match=rf"{name}: grad_pooled has shape \[2, 4\], expected \[2, 3\]"):
        bwd(torch.randn(2, 4, device=device), None, p, w, feats, [True, True])
    with pytest.raises(RuntimeError, match=rf"{name}: grad_weights has shape \[2, 5, 2\], expected \[2, 5, 3\]"):
        bwd(gp, w[..., :2], p, w, feats, [True, True])
    with pytest.raises(RuntimeError, match=rf"{name}: weights \[2, 4, 3\] must have the shape of features"):
        bwd(gp, None, p, w[:, :4], feats, [True, True])
    lp, fp, offs = make_packed([3, 0, 5], 3, torch.float32, device)
    pp, wp = packed(lp, fp, offs)
    bwdp = torch.ops.maskattn._masked_channel_attention_pool_packed_backward
    name = "_masked_channel_attention_pool_packed_backward"
    with pytest.raises(
        RuntimeError, match=rf"{name}: pooled has shape \[2, 3\], expected \[B, D\] = \[3, 3\] \(B = off"
    ):
        bwdp(torch.randn_like(pp), None, pp[:2], wp, fp, offs, [True, True])
    if device == "cpu":
        with pytest.raises(RuntimeError, match=rf"{name}: offsets\[-1\] = 7 must equal T"):
            bwdp(torch.randn_like(pp), None, pp, wp, fp, torch.tensor([0, 3, 3, 7]), [True, True])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_weight_entries_get_zero_gradient_for_nonfinite_grad_pooled(device, dtype):
    logits, feats, mask = make(2, 9, 4, dtype, device)
    logits[0, 1, 2] = -INF  # a valid entry of weight 0
    feats[0, 1, 2] = NAN
    p, w = pool(logits, feats, mask)
    gp = torch.randn_like(p)
    gp[0, 2] = INF
    gp[1, 0] = NAN
    gw = torch.randn_like(w)
    for bwd_args in ((gp, None), (gp, gw)):
        gl, gf = torch.ops.maskattn._masked_channel_attention_pool_backward(*bwd_args, p, w, feats, [True, True])
        zero = w == 0
        assert zero[~mask].all() and zero[0, 1, 2]
        assert (gl[zero] == 0).all() and (gf[zero] == 0).all()
        # and entries of weight > 0 in the non-finite channels are non-finite, as the chain rule gives
        assert not gf[0, mask[0], 2][w[0, mask[0], 2] > 0].isfinite().any()


@pytest.mark.parametrize("device", DEVICES)
def test_long_bag_split_whose_max_lets_a_nonfinite_feature_in(device):
    # A long bag: the first half at logit 0, the second at -100 (CUDA splits it across blocks, the
    # CPU into blocks of rows; a slice of the second half has max -100). The entry at -110 weighs
    # e^-10 against that slice's max but exactly 0 against the bag's: its inf / NaN feature must not
    # reach pooled, in either layout.
    N, D = 1 << 17, 4
    logits = torch.zeros(1, N, D)
    feats = torch.rand(1, N, D)
    logits[0, N // 2 :] = -100.0
    bad = 3 * N // 4 + 5
    logits[0, bad] = -110.0
    feats[0, bad, 0] = INF
    feats[0, bad, 1] = NAN
    clean = feats.clone()
    clean[0, bad] = 0.5
    pr, _ = reference_channel_pool(logits, clean)
    logits, feats = logits.to(device), feats.to(device)
    p, w = pool(logits, feats)
    assert (w[0, bad] == 0).all() and torch.isfinite(p).all()
    close(p, pr, 1e-6, "pooled")
    p2, w2 = packed(logits[0], feats[0], torch.tensor([0, N], device=device))
    assert (w2[bad] == 0).all() and torch.isfinite(p2).all()
    close(p2, pr, 1e-6, "packed pooled")


def test_unused_output_gets_no_materialised_gradient():
    # A loss on pooled only must not hand the backward a zeros [B, N, D] grad_weights (an
    # allocation and a second pass over the weights); a loss on the weights only still works.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append((str(func), args))
            return func(*args, **(kwargs or {}))

    logits, feats, mask = make(2, 7, 3, torch.float64)
    for fn, ref in ((pool, reference_channel_pool), (None, None)):
        l, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        if fn is None:  # packed
            offs = torch.tensor([0, 3, 14])
            p, w = packed(l.view(14, 3), f.view(14, 3), offs)
            pr, wr = reference_channel_pool_packed(l.view(14, 3), f.view(14, 3), offs)
        else:
            p, w = fn(l, f, mask)
            pr, wr = ref(l, f, mask)
        with Calls() as calls:
            got = torch.autograd.grad(p.sum(), (l, f), retain_graph=True)
        (args,) = [a for name, a in calls.seen if "_masked_channel_attention_pool" in name and "backward" in name]
        assert args[1] is None and not any(name.startswith("aten.zeros") for name, _ in calls.seen)
        for a, b in zip(got, torch.autograd.grad(pr.sum(), (l, f), retain_graph=True)):
            torch.testing.assert_close(a, b)
        gw = torch.linspace(-1, 1, w.numel(), dtype=w.dtype).view(w.shape)
        got = torch.autograd.grad(w, (l, f), gw, allow_unused=True)
        want = torch.autograd.grad(wr, (l, f), gw, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(got[0], want[0])
        assert got[1] is None or (got[1] == 0).all()
