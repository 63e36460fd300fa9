"""The written numerics rules of docs/numerics.md that CPU and CUDA must follow alike, one test per
rule, on every device present:

* masked_attention_pool's backward with D = 0 still gives the logits the weights' own gradient;
* a row weighed 0 by one branch (K > 1) is skipped by that branch, whatever it holds, even when
  another branch weighs it (and so reads it);
* a zero-weight row gets exactly 0 feature gradient, also when grad_pooled is inf/NaN (K = 1, K > 1;
  the same for gated_masked_mean's zero-gate pixels);
* subnormal weights are kept (equal to the float64 value rounded, within a few subnormal steps),
  not flushed to 0;
* gated_masked_mean skips every zero-weight pixel - padding and valid pixels whose gate is 0 - with
  and without a mask, channels-first and channels-last;
* foreground_mask's grey level is float64 without FMA contraction, so its binary mask equals the
  float64 reference exactly, also for pixels exactly at the threshold.
"""

import math

import pytest
import torch
from conftest import DEVICES
from reference_foreground_mask import _grey, reference_content_mask
from reference_masked_attention_pool import reference_pool, reference_pool_packed

import maskattn

NAN, INF = float("nan"), float("inf")
SUB = 2.0**-149  # the float32 subnormal step


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ masked_attention_pool, D = 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_pool_backward_with_no_features_gives_the_weights_gradient(device, K, packed):
    g = _gen(0)
    B, N = 3, 7
    logits = torch.randn((B, N) if K is None else (B, N, K), generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[:, 0] = True
    gw = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    if packed:
        lens = mask.sum(1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        lp, fp, gwp = logits[mask], torch.zeros(int(lens.sum()), 0, dtype=torch.float64), gw[mask]
        l = lp.clone().to(device).requires_grad_()
        _, w = maskattn.masked_attention_pool_packed(l, fp.to(device), offsets.to(device))
        (gl,) = torch.autograd.grad(w, l, gwp.to(device))
        lr = lp.clone().requires_grad_()
        _, wr = reference_pool_packed(lr, fp, offsets)
        (glr,) = torch.autograd.grad(wr, lr, gwp)
    else:
        f = torch.zeros(B, N, 0, dtype=torch.float64)
        l = logits.clone().to(device).requires_grad_()
        _, w = maskattn.masked_attention_pool(l, f.to(device), mask.to(device))
        (gl,) = torch.autograd.grad(w, l, gw.to(device))
        lr = logits.clone().requires_grad_()
        _, wr = reference_pool(lr, f, mask)
        (glr,) = torch.autograd.grad(wr, lr, gw)
    assert glr.abs().max() > 0.1  # the gradient being checked is not trivially zero
    torch.testing.assert_close(gl.cpu(), glr, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ masked_attention_pool, K > 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("dead", ["-inf logit", "underflow"])
def test_pool_branch_skips_its_zero_weight_rows_that_another_branch_reads(device, dtype, bad, dead):
    g = _gen(1)
    B, N, K, D = 2, 12, 3, 5
    logits = torch.randn(B, N, K, generator=g).to(dtype)
    feats = torch.randn(B, N, D, generator=g).to(dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    r = 4
    # row r of bag 0: weight exactly 0 in branch 0 (a -inf logit, or one whose exp underflows),
    # nonzero in branches 1 and 2, so the row is read for them
    logits[0, r, 0] = -INF if dead == "-inf logit" else -1e4
    logits, feats, mask = logits.to(device), feats.to(device), mask.to(device)
    clean = feats.clone()
    clean[0, r] = 0
    poisoned = feats.clone()
    poisoned[0, r] = bad
    gp = torch.randn(B, K, D, generator=g).to(dtype).to(device)
    gw = torch.randn(B, N, K, generator=g).to(dtype).to(device)

    def run(f):
        l, ff = logits.clone().requires_grad_(), f.clone().requires_grad_()
        p, w = maskattn.masked_attention_pool(l, ff, mask)
        gl, gf = torch.autograd.grad((p, w), (l, ff), (gp, gw))
        return p, w, gl, gf

    p0, w0, gl0, gf0 = run(clean)
    p, w, gl, gf = run(poisoned)
    assert w[0, r, 0] == 0 and (w[0, r, 1:] > 0).all()
    # branch 0 never sees the row: bit-identical to the clean run, forward and backward
    assert torch.equal(p[:, 0], p0[:, 0]) and torch.isfinite(p[:, 0]).all()
    assert torch.equal(gl[..., 0], gl0[..., 0]) and torch.isfinite(gl[..., 0]).all()
    # the branches that weigh it carry the non-finite value (as torch would)
    assert not torch.isfinite(p[0, 1:]).all()
    # the other bag is untouched
    assert torch.equal(p[1], p0[1]) and torch.equal(gl[1], gl0[1]) and torch.equal(gf[1], gf0[1])
    # grad_features does not involve the features: unchanged everywhere
    assert torch.equal(gf, gf0)


# ------------------------------------------------------------------ zero-weight gradients, non-finite grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_pool_padding_gradient_is_zero_for_nonfinite_grad_pooled(device, dtype, K, bad):
    g = _gen(2)
    B, N, D = 3, 10, 6
    logits = torch.randn((B, N) if K is None else (B, N, K), generator=g).to(dtype).to(device)
    feats = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, 0] = True
    mask[:, -1] = False
    mask = mask.to(device)
    gp = torch.randn((B, D) if K is None else (B, K, D), generator=g).to(dtype)
    gp[0, ..., 1] = bad  # bag 0's pooled gradient is non-finite
    f = feats.clone().requires_grad_()
    p, _ = maskattn.masked_attention_pool(logits, f, mask)
    (gf,) = torch.autograd.grad(p, f, gp.to(device))
    pad = ~mask
    assert (gf[pad] == 0).all()  # exactly 0, not 0 * inf = NaN
    assert not torch.isfinite(gf[0][mask[0]]).all()  # the valid rows of bag 0 do carry it
    assert torch.isfinite(gf[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_packed_pool_padding_free_rows_with_zero_weight_get_zero_gradient(device, dtype, bad):
    # packed bags have no padding; a -inf logit is the zero-weight row
    g = _gen(3)
    T, D = 9, 4
    logits = torch.randn(T, generator=g).to(dtype)
    logits[2] = -INF
    feats = torch.randn(T, D, generator=g).to(dtype)
    offsets = torch.tensor([0, 5, 9])
    gp = torch.randn(2, D, generator=g).to(dtype)
    gp[0, 0] = bad
    f = feats.clone().to(device).requires_grad_()
    p, _ = maskattn.masked_attention_pool_packed(logits.to(device), f, offsets.to(device))
    (gf,) = torch.autograd.grad(p, f, gp.to(device))
    assert (gf[2] == 0).all() and torch.isfinite(gf[5:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_mean_zero_gate_gradient_is_zero_for_nonfinite_grad_pooled(device, bad, channels_last):
    g = _gen(4)
    B, C, H, W = 2, 3, 4, 5
    f = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    gl = torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    gl[0, 0, 1, 1] = -INF  # a valid pixel whose gate is exactly 0
    m = torch.rand(B, H, W, generator=g) < 0.7
    m[:, 1, 1] = True
    m[:, 0, 0] = False
    if channels_last:
        f = f.to(memory_format=torch.channels_last)
    f, gl, m = f.to(device).requires_grad_(), gl.to(device), m.to(device)
    gp = torch.randn(B, C, generator=g, dtype=torch.float64)
    gp[0, 1] = bad
    pooled, _ = maskattn.gated_masked_mean(f, gl, m)
    (gf,) = torch.autograd.grad(pooled, f, gp.to(device))
    assert (gf.permute(0, 2, 3, 1)[~m] == 0).all()  # padding: exactly 0
    assert (gf[0, :, 1, 1] == 0).all()  # zero gate: exactly 0
    assert not torch.isfinite(gf[0, 1][m[0]]).all() and torch.isfinite(gf[1]).all()


# ------------------------------------------------------------------ subnormal weights


# Logits whose softmax weights span the float32 subnormal range: with max 0, e^-88 ... e^-103 are
# subnormal (the smallest subnormal is e^-103.3), e^-105 rounds to 0.
SUBNORMAL_ROW = [0.0, -88.0, -90.5, -93.0, -95.25, -97.0, -99.5, -101.0, -102.5, -105.0, 1.5, -3.0, -40.0]


def _check_subnormal(w, ref, valid):
    """w (float32) vs the float64 reference: within 3 subnormal steps, and never 0 where the
    reference is at least 4 steps (a flush to zero fails)."""
    w, ref = w.double().cpu(), ref.double().cpu()
    ref32 = ref.float().double()
    tiny = valid & (ref < torch.finfo(torch.float32).tiny) & (ref > 0)
    assert tiny.sum() >= 5, "the case has subnormal weights"
    assert ((w - ref32).abs()[tiny] <= 3 * SUB).all(), (w[tiny], ref32[tiny])
    assert (w[tiny & (ref >= 4 * SUB)] > 0).all()
    normal = valid & ~tiny
    torch.testing.assert_close(w[normal], ref[normal], rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [13, 40, 2000])
@pytest.mark.parametrize("dim", [-1, 0])
def test_masked_softmax_keeps_subnormal_weights(device, N, dim):
    row = torch.tensor(SUBNORMAL_ROW * (N // len(SUBNORMAL_ROW) + 1))[:N]
    x = torch.stack([row, row.roll(5), row.flip(0)])  # [3, N]
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 3] = False
    if dim == 0:
        x, mask = x.t().contiguous(), mask.t().contiguous()
    ref = torch.softmax(x.double().masked_fill(~mask, -INF), dim)
    w = maskattn.masked_softmax(x.to(device), mask.to(device), dim=dim)
    _check_subnormal(w, ref, mask)
    # the same scores through the scale (x / 2 * 2 is exact)
    ws = maskattn.masked_softmax((x / 2).to(device), mask.to(device), dim=dim, scale=2.0)
    _check_subnormal(ws, ref, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("N", [13, 3000])
def test_pool_keeps_subnormal_weights(device, K, N):
    row = torch.tensor(SUBNORMAL_ROW * (N // len(SUBNORMAL_ROW) + 1))[:N]
    logits = torch.stack([row, row.roll(3)])  # [2, N]
    if K is not None:
        logits = torch.stack([logits.roll(k, 1) for k in range(K)], -1)
    feats = torch.rand(2, N, 4, generator=_gen(5))
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, -2:] = False
    _, ref = reference_pool(logits, feats, mask)
    _, w = maskattn.masked_attention_pool(logits.to(device), feats.to(device), mask.to(device))
    vm = mask if K is None else mask[..., None].expand_as(logits)
    _check_subnormal(w, ref, vm)
    offsets = torch.tensor([0, N, 2 * N])
    _, wp = maskattn.masked_attention_pool_packed(
        logits.reshape(2 * N, *logits.shape[2:]).to(device), feats.reshape(2 * N, 4).to(device), offsets.to(device)
    )
    _, refp = reference_pool(logits, feats)
    _check_subnormal(wp.reshape(logits.shape), refp, torch.ones_like(vm))


# ------------------------------------------------------------------ gated_masked_mean, the zero-gate rule


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("gate", ["-inf", "underflow"])
def test_gated_mean_skips_zero_gate_pixels(device, dtype, with_mask, channels_last, bad, gate):
    g = _gen(6)
    B, C, H, W = 2, 4, 5, 6
    f = torch.randn(B, C, H, W, generator=g).to(dtype)
    gl = torch.randn(B, 1, H, W, generator=g).to(dtype)
    # pixel (2, 3) of sample 0 is valid but its gate is exactly 0: sigmoid(-inf), or a logit whose
    # sigmoid underflows in this dtype
    gl[0, 0, 2, 3] = -INF if gate == "-inf" else (-200.0 if dtype == torch.float32 else -1000.0)
    m = None
    if with_mask:
        m = torch.rand(B, H, W, generator=g) < 0.7
        m[:, 2, 3] = True
    clean = f.clone()
    clean[0, :, 2, 3] = 0
    poisoned = f.clone()
    poisoned[0, :, 2, 3] = bad
    if channels_last:
        clean = clean.to(memory_format=torch.channels_last)
        poisoned = poisoned.to(memory_format=torch.channels_last)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    p0, gt0 = maskattn.gated_masked_mean(dev(clean), dev(gl), dev(m))
    p, gt = maskattn.gated_masked_mean(dev(poisoned), dev(gl), dev(m))
    assert gt[0, 0, 2, 3] == 0
    assert torch.isfinite(p).all()
    # the same value as the clean input (the plain and the selecting sum may round differently)
    torch.testing.assert_close(p, p0, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)


# ------------------------------------------------------------------ foreground_mask, the luma rule


def _edge_images(dtype, C, seed):
    """One bright connected background (well above any threshold used) with an isolated grid of
    test pixels whose grey levels crowd around the threshold. With no morphology, no hole filling
    and no smoothing, the output is exactly the thresholded grey level: every bright pixel is in
    the one large component, each foreground test pixel joins it, each background one stays 0."""
    g = _gen(seed)
    B, H, W = 2, 16, 16
    if dtype == torch.uint8:
        x = torch.full((B, C, H, W), 200, dtype=torch.uint8)
        # channel values around 25: luma around 25, i.e. grey around 0.1
        test = torch.randint(18, 33, (B, C, H // 2, W // 2), generator=g, dtype=torch.uint8)
    else:
        x = torch.full((B, C, H, W), 0.8, dtype=dtype)
        # channel values 0.1 + k * 4 float steps, |k| <= 20 (one binade, so the values are exact)
        base = float(torch.tensor(0.1, dtype=dtype))
        step = 4 * 2.0 ** math.floor(math.log2(base)) * torch.finfo(dtype).eps
        k = torch.randint(-20, 21, (B, C, H // 2, W // 2), generator=g, dtype=torch.float64)
        test = (base + k * step).to(dtype)
    x[..., 1::2, 1::2] = test
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_foreground_threshold_matches_float64_reference_at_the_edge(device, dtype, C):
    x = _edge_images(dtype, C, seed=C)
    grey = _grey(x[..., 1::2, 1::2])  # the test pixels' grey levels, float64, as the reference
    # thresholds equal to test pixels' grey levels (those pixels sit exactly on the edge: not
    # foreground), and one float64 step either side
    levels = grey.flatten().unique()  # sorted
    picks = [levels[int(q * (levels.numel() - 1))].item() for q in (0.25, 0.5, 0.75)]
    thresholds = []
    for t in picks:
        thresholds += [t, math.nextafter(t, -math.inf), math.nextafter(t, math.inf)]
    for i, t in enumerate(thresholds):
        # the reference's rule on this construction: bright pixels 1, test pixels grey > t
        ref = torch.ones(x.shape[0], x.shape[2], x.shape[3])
        ref[..., 1::2, 1::2] = (grey > t).float()
        if i == 0:  # the construction is what the full reference pipeline gives
            assert torch.equal(reference_content_mask(x, t, 0, 0, False, 0.0)[0], ref)
        m, _ = maskattn.foreground_mask(x.to(device), t, 0, 0, False, 0.0)
        assert torch.equal(m.cpu(), ref), (t, (grey == t).sum().item())
        # the case exercises the edge: test pixels on each side
        assert 0 < ref[..., 1::2, 1::2].sum() < grey.numel()
    assert (grey == thresholds[0]).any()  # and pixels exactly on it
