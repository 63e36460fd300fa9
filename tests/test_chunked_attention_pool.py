"""Exact attention pooling in pieces (docs/api.md, "Huge bags"): partial states and their
log-sum-exp merge equal the unchunked op in any split, forward and backward; the chunked driver
equals ``masked_attention_pool(score_fn(features), features, mask)`` for single, padded and packed
bags, every chunk size, with and without checkpointing; the non-finite rules of docs/numerics.md
hold across chunks; and the checkpointed driver keeps no O(N) activations of the scoring network."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES
from torch import nn

import maskattn

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def _close(a, b, tol=1e-10, what=""):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


class GatedScorer(nn.Module):
    """CLAM's gated attention (tanh(Linear) * sigmoid(Linear) -> Linear), row by row."""

    def __init__(self, d, hidden=7, k=None, dropout=0.0):
        super().__init__()
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(d, hidden)
        self.c = nn.Linear(hidden, k or 1)
        self.drop = nn.Dropout(dropout)
        self.k = k

    def forward(self, x):
        s = self.c(self.drop(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x))))
        return s.squeeze(-1) if self.k is None else s


def _padded(B=3, N=11, D=5, seed=0, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=F64)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[0, :] = True  # a full bag
    if B > 2:
        mask[2, :] = False  # an empty bag
    if B > 1:
        mask[1, :4] = False  # a bag whose first chunks are empty
        mask[1, -1] = True
    return x.to(device, dtype), mask.to(device)


def _logits(lead, K, seed=1, device="cpu", dtype=F64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if K is None else tuple(lead) + (K,)
    return (scale * torch.randn(shape, generator=g, dtype=F64)).to(device, dtype)


def _split_padded(logits, x, mask, cuts):
    return [
        maskattn.attention_pool_partial(logits[:, s:e], x[:, s:e], None if mask is None else mask[:, s:e])
        for s, e in zip(cuts[:-1], cuts[1:])
    ]


def _ref_lse(logits, mask):
    ll = logits.masked_fill(~(mask.unsqueeze(-1) if logits.dim() == 3 else mask), -INF)
    return torch.logsumexp(ll, 1)


# ------------------------------------------------------------------ partial + merge


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("cuts", [[0, 11], [0, 3, 3, 7, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 4, 10, 11]])
def test_partial_merge_equals_unchunked(device, K, cuts):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], K, device=device)
    ref_p, ref_w = maskattn.masked_attention_pool(logits, x, mask)
    parts = _split_padded(logits, x, mask, cuts)
    pooled, lse = maskattn.attention_pool_merge(*zip(*parts))
    _close(pooled, ref_p, what="pooled")
    _close(lse, _ref_lse(logits, mask), what="lse")
    assert torch.equal(lse[2], torch.full_like(lse[2], -INF)) and torch.equal(pooled[2], torch.zeros_like(pooled[2]))
    # the stacked form, along another axis
    P = torch.stack([p for p, _ in parts], 1)
    L = torch.stack([s for _, s in parts], 1)
    pooled2, lse2 = maskattn.attention_pool_merge(P, L, dim=1)
    _close(pooled2, ref_p, what="stacked")
    _close(lse2, lse, what="stacked lse")
    # weights of each chunk from the global lse are the op's weights
    w = torch.cat(
        [maskattn.attention_pool_weights(logits[:, s:e], lse, mask[:, s:e]) for s, e in zip(cuts[:-1], cuts[1:])], 1
    )
    _close(w, ref_w, what="weights")
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_is_associative_and_order_free(device):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], 3, device=device)
    a, b, c = _split_padded(logits, x, mask, [0, 2, 8, 11])
    all3 = maskattn.attention_pool_merge(*zip(a, b, c))
    nested = maskattn.attention_pool_merge(*zip(maskattn.attention_pool_merge(*zip(a, b)), c))
    reordered = maskattn.attention_pool_merge(*zip(c, a, b))
    for got in (nested, reordered):
        _close(got[0], all3[0], what="pooled")
        _close(got[1], all3[1], what="lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
def test_partial_merge_gradients_equal_unchunked(device, K):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], K, device=device)
    g = torch.Generator().manual_seed(5)
    ref_p = maskattn.masked_attention_pool(logits, x, mask)[0]
    gp = torch.randn(ref_p.shape, generator=g, dtype=F64).to(device)
    gw = torch.randn(logits.shape, generator=g, dtype=F64).to(device)

    def run(chunked):
        lg, xf = logits.clone().requires_grad_(), x.clone().requires_grad_()
        if chunked:
            cuts = [0, 3, 3, 7, 11]
            parts = _split_padded(lg, xf, mask, cuts)
            p, lse = maskattn.attention_pool_merge(*zip(*parts))
            w = maskattn.attention_pool_weights(lg, lse, mask)
        else:
            p, w = maskattn.masked_attention_pool(lg, xf, mask)
        ((p * gp).sum() + (w * gw).sum()).backward()
        return lg.grad, xf.grad

    for got, ref, what in zip(run(True), run(False), ("logits", "features")):
        assert torch.isfinite(got).all(), what
        _close(got, ref, what=what)


def test_gradcheck_partial_merge_weights():
    x, mask = _padded(B=3, N=5, D=2)
    logits = _logits(x.shape[:2], 2)
    lg, xf = logits.requires_grad_(), x.requires_grad_()

    def fn(lg, xf):
        parts = _split_padded(lg, xf, mask, [0, 2, 2, 5])
        p, lse = maskattn.attention_pool_merge(*zip(*parts))
        w = maskattn.attention_pool_weights(lg, lse, mask)
        # lse of the empty bag is -inf: keep the finite entries (its gradient is checked to be 0 elsewhere)
        return p, w, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (lg, xf))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
def test_packed_partial_merge_equals_unchunked(device, K):
    offsets = torch.tensor([0, 4, 4, 9, 15, 16], device=device)
    T, D = 16, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g, dtype=F64).to(device)
    logits = _logits((T,), K, device=device)
    ref_p, ref_w = maskattn.masked_attention_pool_packed(logits, x, offsets)
    cuts = [0, 3, 6, 6, 10, 16]
    parts, ws = [], []
    for s, e in zip(cuts[:-1], cuts[1:]):
        local = offsets.clamp(s, e) - s
        parts.append(maskattn.attention_pool_partial_packed(logits[s:e], x[s:e], local))
    pooled, lse = maskattn.attention_pool_merge(*zip(*parts))
    _close(pooled, ref_p, what="pooled")
    ref_lse = torch.stack([torch.logsumexp(logits[a:b], 0) for a, b in zip(offsets[:-1], offsets[1:])])
    _close(lse, ref_lse, what="lse")
    for s, e in zip(cuts[:-1], cuts[1:]):
        ws.append(maskattn.attention_pool_weights(logits[s:e], lse, offsets=offsets.clamp(s, e) - s))
    _close(torch.cat(ws), ref_w, what="weights")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_everywhere_gives_zeros_and_zero_grad(device):
    x, _ = _padded(device=device)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=device)
    lg = _logits(x.shape[:2], None, device=device).requires_grad_()
    xf = x.clone().requires_grad_()
    parts = _split_padded(lg, xf, mask, [0, 5, 11])
    p, lse = maskattn.attention_pool_merge(*zip(*parts))
    w = maskattn.attention_pool_weights(lg, lse, mask)
    assert torch.equal(p, torch.zeros_like(p)) and torch.equal(w, torch.zeros_like(w))
    assert (lse == -INF).all()
    (p.sum() + w.sum()).backward()
    assert torch.equal(lg.grad, torch.zeros_like(lg)) and torch.equal(xf.grad, torch.zeros_like(xf))
    # all -inf logits behave like an empty bag (docs/numerics.md rule 4)
    lg2 = torch.full(x.shape[:2], -INF, dtype=F64, device=device, requires_grad=True)
    parts = _split_padded(lg2, x, None, [0, 5, 11])
    p2, lse2 = maskattn.attention_pool_merge(*zip(*parts))
    assert torch.equal(p2, torch.zeros_like(p2)) and (lse2 == -INF).all()
    p2.sum().backward()
    assert torch.equal(lg2.grad, torch.zeros_like(lg2))


def test_merge_errors():
    p = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="attention_pool_merge: pooled must be"):
        maskattn.attention_pool_merge(p, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="attention_pool_merge: dim"):
        maskattn.attention_pool_merge(p, torch.zeros(2, 3), dim=-1)
    with pytest.raises(ValueError, match="attention_pool_weights: logits must be"):
        maskattn.attention_pool_weights(torch.zeros(2, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="not both"):
        maskattn.attention_pool_weights(torch.zeros(5), torch.zeros(1), torch.ones(5), torch.tensor([0, 5]))


# ------------------------------------------------------------------ non-finite rules across chunks


def _grads_through_chunks(logits, x, mask, cuts, gp, gw):
    lg, xf = logits.clone().requires_grad_(), x.clone().requires_grad_()
    parts = _split_padded(lg, xf, mask, cuts)
    p, lse = maskattn.attention_pool_merge(*zip(*parts))
    w = maskattn.attention_pool_weights(lg, lse, mask)
    ((p * gp).nansum() + (w * gw).nansum()).backward()
    return p, w, lse, lg.grad, xf.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nan_or_inf_logit_poisons_its_bag_only(device, K, bad):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], K, device=device)
    cuts = [0, 3, 7, 11]
    g = torch.Generator().manual_seed(2)
    gp = torch.randn((3, x.shape[-1]) if K is None else (3, K, x.shape[-1]), generator=g, dtype=F64).to(device)
    gw = torch.randn(logits.shape, generator=g, dtype=F64).to(device)
    p0, w0, lse0, gl0, gf0 = _grads_through_chunks(logits, x, mask, cuts, gp, gw)
    bad_logits = logits.clone()
    bad_logits[0, 8] = bad  # bag 0, third chunk; every branch
    p, w, lse, gl, gf = _grads_through_chunks(bad_logits, x, mask, cuts, gp, gw)
    ref_p, ref_w = maskattn.masked_attention_pool(bad_logits, x, mask)
    assert torch.isnan(p[0]).all() and torch.isnan(ref_p[0]).all()
    assert torch.isnan(w[0][mask[0]]).all(), "every valid weight of the poisoned bag is NaN"
    _close(w, ref_w, what="weights as the op")
    for b in (1, 2):  # the other bags: untouched, forward and backward
        _close(p[b], p0[b], what="pooled")
        _close(w[b], w0[b], what="weights")
        _close(gl[b], gl0[b], what="logit grad")
        _close(gf[b], gf0[b], what="feature grad")
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_logits_take_weight_zero(device):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], None, device=device)
    cuts = [0, 3, 7, 11]
    bad = logits.clone()
    bad[0, 3:7] = -INF  # a whole chunk of bag 0 at -inf
    bad[1, 9] = -INF
    xb = x.clone()
    xb[0, 3:7] = NAN  # content behind a -inf logit is ignored
    g = torch.Generator().manual_seed(4)
    gp = torch.randn(3, x.shape[-1], generator=g, dtype=F64).to(device)
    gw = torch.randn(logits.shape, generator=g, dtype=F64).to(device)
    p, w, lse, gl, gf = _grads_through_chunks(bad, xb, mask, cuts, gp, gw)
    ref_p, ref_w = maskattn.masked_attention_pool(bad, x, mask)
    _close(p, ref_p, what="pooled")
    _close(w, ref_w, what="weights")
    assert torch.equal(w[0, 3:7], torch.zeros_like(w[0, 3:7])) and w[1, 9] == 0
    assert torch.isfinite(gl).all() and torch.isfinite(gf).all()
    assert torch.equal(gf[0, 3:7], torch.zeros_like(gf[0, 3:7]))


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_whose_merged_weight_underflows_is_skipped(device):
    """A row the whole bag's softmax weighs exactly 0 (exp underflows) is never read by the fused
    op; alone in its chunk it has weight 1, so its NaN features must not reach the merged pooled
    vector through 0 * NaN. (Its own logit's gradient is NaN there, where the unchunked op gives 0:
    the chunk's fused backward reads the row; docs/numerics.md.)"""
    x = torch.randn(1, 4, 3, dtype=F64, device=device)
    x[0, 3] = NAN
    logits = torch.tensor([[0.0, 1.0, 0.5, -800.0]], dtype=F64, device=device, requires_grad=True)
    ref_p, ref_w = maskattn.masked_attention_pool(logits, x)
    assert ref_w[0, 3] == 0 and torch.isfinite(ref_p).all()
    p, lse = maskattn.attention_pool_merge(*zip(*_split_padded(logits, x, None, [0, 3, 4])))
    _close(p, ref_p, what="pooled")
    (ref_grad,) = torch.autograd.grad(ref_p.sum(), logits)
    p.sum().backward()
    _close(logits.grad[0, :3], ref_grad[0, :3], what="the other rows' logit gradients")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_padding_content_never_leaks_across_chunks(device, bad):
    x, mask = _padded(device=device)
    logits = _logits(x.shape[:2], 2, device=device)
    cuts = [0, 3, 7, 11]
    g = torch.Generator().manual_seed(6)
    gp = torch.randn(3, 2, x.shape[-1], generator=g, dtype=F64).to(device)
    gw = torch.randn(logits.shape, generator=g, dtype=F64).to(device)
    clean = _grads_through_chunks(logits, x, mask, cuts, gp, gw)
    lb, xb = logits.clone(), x.clone()
    lb[~mask] = bad
    xb[~mask] = bad
    dirty = _grads_through_chunks(lb, xb, mask, cuts, gp, gw)
    for a, b, what in zip(dirty, clean, ("pooled", "weights", "lse", "logit grad", "feature grad")):
        assert torch.equal(a, b) or (a.isfinite() == b.isfinite()).all(), what
        _close(a, b, what=what)
    assert torch.equal(dirty[3][~mask], torch.zeros_like(dirty[3][~mask]))
    assert torch.equal(dirty[4][~mask], torch.zeros_like(dirty[4][~mask]))


# ------------------------------------------------------------------ the chunked driver


def _loss_grads(out, gp, gw, params, extra):
    pooled, weights = out[0], out[1]
    loss = (pooled * gp).sum() + (weights * gw).sum()
    return torch.autograd.grad(loss, list(params) + extra)


def _compare_driver(scorer, features, chunk, mask=None, offsets=None, checkpoint=True, tol=1e-10):
    g = torch.Generator().manual_seed(7)
    xf = features.clone().requires_grad_()
    s_ref = scorer(xf)
    if offsets is not None:
        ref = maskattn.masked_attention_pool_packed(s_ref, xf, offsets)
    elif features.dim() == 2:
        ref = maskattn.masked_attention_pool(s_ref[None], xf[None], None if mask is None else mask[None])
        ref = (ref[0][0], ref[1][0])
    else:
        ref = maskattn.masked_attention_pool(s_ref, xf, mask)
    gp = torch.randn(ref[0].shape, generator=g, dtype=F64).to(features.device, features.dtype)
    gw = torch.randn(ref[1].shape, generator=g, dtype=F64).to(features.device, features.dtype)
    ref_grads = _loss_grads(ref, gp, gw, scorer.parameters(), [xf])

    xc = features.clone().requires_grad_()
    out = maskattn.chunked_attention_pool(
        scorer, xc, chunk, mask=mask, offsets=offsets, checkpoint=checkpoint, return_scores=True, return_lse=True
    )
    pooled, weights, scores, lse = out
    _close(pooled, ref[0], tol, "pooled")
    _close(weights, ref[1], tol, "weights")
    _close(scores, s_ref, tol, "scores")
    assert lse.shape == pooled.shape[:-1]
    got_grads = _loss_grads(out, gp, gw, scorer.parameters(), [xc])
    for (name, _), a, b in zip(list(scorer.named_parameters()) + [("features", None)], got_grads, ref_grads):
        _close(a, b, tol, f"grad {name}")


CHUNKS = [1, 4, 11, 50]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("checkpoint", [True, False])
def test_driver_padded(device, K, chunk, checkpoint):
    torch.manual_seed(0)
    x, mask = _padded(device=device)
    scorer = GatedScorer(x.shape[-1], k=K).to(device, F64)
    _compare_driver(scorer, x, chunk, mask=mask, checkpoint=checkpoint)
    _compare_driver(scorer, x, chunk, mask=None, checkpoint=checkpoint)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_driver_single_bag(device, K, chunk):
    torch.manual_seed(0)
    x = _padded(B=1, N=11, device=device)[0][0]
    scorer = GatedScorer(x.shape[-1], k=K).to(device, F64)
    _compare_driver(scorer, x, chunk)
    mask = torch.ones(11, dtype=torch.int32, device=device)
    mask[[2, 3, 9]] = 0
    _compare_driver(scorer, x, chunk, mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_driver_packed_chunks_span_bags(device, K, chunk):
    torch.manual_seed(0)
    offsets = torch.tensor([0, 4, 4, 9, 15, 16, 16], device=device)  # empty bags inside and at the end
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 5, generator=g, dtype=F64).to(device)
    scorer = GatedScorer(5, k=K).to(device, F64)
    _compare_driver(scorer, x, chunk, offsets=offsets)


@pytest.mark.parametrize("device", DEVICES)
def test_driver_empty_inputs(device):
    scorer = GatedScorer(5, k=2).to(device, F64)
    x = torch.zeros(0, 5, dtype=F64, device=device)
    pooled, w = maskattn.chunked_attention_pool(scorer, x, 4, offsets=torch.zeros(3, dtype=torch.int64, device=device))
    assert pooled.shape == (2, 2, 5) and torch.equal(pooled, torch.zeros_like(pooled)) and w.shape == (0, 2)
    pooled, w = maskattn.chunked_attention_pool(scorer, x, 4)
    assert pooled.shape == (2, 5) and torch.equal(pooled, torch.zeros_like(pooled))
    pooled, w = maskattn.chunked_attention_pool(scorer, torch.zeros(3, 0, 5, dtype=F64, device=device), 4)
    assert pooled.shape == (3, 2, 5) and torch.equal(pooled, torch.zeros_like(pooled))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_driver_nonfinite_padding_reaches_no_gradient(device, bad):
    torch.manual_seed(0)
    x, mask = _padded(device=device)
    scorer = GatedScorer(x.shape[-1], k=2).to(device, F64)
    xb = x.clone()
    xb[~mask] = bad
    outs = []
    for feats in (x, xb):
        xf = feats.clone().requires_grad_()
        pooled, w = maskattn.chunked_attention_pool(scorer, xf, 4, mask=mask)
        grads = torch.autograd.grad(pooled.sum() + (w * w).sum(), list(scorer.parameters()) + [xf])
        outs.append((pooled, w, grads))
    (p0, w0, g0), (p1, w1, g1) = outs
    _close(p1, p0, what="pooled")
    _close(w1, w0, what="weights")
    for a, b in zip(g1, g0):
        assert torch.isfinite(a).all()
        _close(a, b, what="grad")


@pytest.mark.parametrize("device", DEVICES)
def test_driver_nan_instance_poisons_its_bag_only(device):
    torch.manual_seed(0)
    x, mask = _padded(device=device)
    scorer = GatedScorer(x.shape[-1]).to(device, F64)
    xb = x.clone()
    xb[1, 6] = NAN
    mask = mask.clone()
    mask[1, 6] = True
    p0, w0 = maskattn.chunked_attention_pool(scorer, x, 4, mask=mask)
    p1, w1 = maskattn.chunked_attention_pool(scorer, xb, 4, mask=mask)
    assert torch.isnan(p1[1]).all() and torch.isnan(w1[1][mask[1]]).all()
    _close(p1[[0, 2]], p0[[0, 2]], what="other bags")
    _close(w1[[0, 2]], w0[[0, 2]], what="other weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("branches", [1, 3])
def test_driver_runs_attention_pooling_scores(device, branches):
    """nn.AttentionPooling can hand its forward to the driver: chunk by chunk, its scores give its
    own output and gradients."""
    torch.manual_seed(0)
    x, mask = _padded(device=device)
    mod = maskattn.nn.AttentionPooling(x.shape[-1], 8, gated=True, branches=branches).to(device, F64)
    ref = mod(x, mask)
    got = maskattn.chunked_attention_pool(mod.scores, x, 4, mask=mask)
    _close(got[0], ref[0], what="pooled")
    _close(got[1], ref[1], what="weights")
    g_ref = torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), list(mod.parameters()))
    g_got = torch.autograd.grad(got[0].sum() + got[1].square().sum(), list(mod.parameters()))
    for a, b in zip(g_got, g_ref):
        _close(a, b, what="grad")


def test_driver_dropout_replays_under_checkpoint():
    torch.manual_seed(0)
    x, mask = _padded()
    scorer = GatedScorer(x.shape[-1], k=2, dropout=0.5).to(dtype=F64)
    res = []
    for ckpt in (True, False):
        torch.manual_seed(123)
        pooled, w = maskattn.chunked_attention_pool(scorer, x, 3, mask=mask, checkpoint=ckpt)
        res.append((pooled, torch.autograd.grad(pooled.sum(), list(scorer.parameters()))))
    _close(res[0][0], res[1][0], what="pooled")
    for a, b in zip(res[0][1], res[1][1]):
        _close(a, b, what="grad")
    torch.manual_seed(124)
    other = maskattn.chunked_attention_pool(scorer, x, 3, mask=mask)[0]
    assert not torch.allclose(other, res[0][0]), "dropout is active, so the comparison means something"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_driver_low_precision(device, dtype):
    torch.manual_seed(0)
    N = 3000
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N, 16, generator=g).to(device)
    scorer = GatedScorer(16, hidden=8, k=2).to(device)
    ref = maskattn.masked_attention_pool(scorer.double()(x.double())[None], x.double()[None])
    scorer = scorer.to(dtype)
    pooled, w, lse = maskattn.chunked_attention_pool(scorer, x.to(dtype), 256, return_lse=True)
    assert pooled.dtype == dtype and w.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    # the scoring network itself runs in dtype: compare against the float64 pool of its scores
    s = scorer(x.to(dtype)).double()
    ref = maskattn.masked_attention_pool(s[None], x.double()[None])
    torch.testing.assert_close(pooled.double(), ref[0][0], atol=tol, rtol=tol)
    torch.testing.assert_close(w.double(), ref[1][0], atol=tol / 100, rtol=tol)


def test_driver_errors():
    scorer = GatedScorer(5)
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        maskattn.chunked_attention_pool(scorer, x, 0)
    with pytest.raises(ValueError, match="score_fn must map features"):
        maskattn.chunked_attention_pool(lambda f: f.sum(), x, 2)
    with pytest.raises(ValueError, match="score_fn must map features"):
        maskattn.chunked_attention_pool(lambda f: f[:, :1, 0], x, 2)
    with pytest.raises(ValueError, match="not both"):
        maskattn.chunked_attention_pool(scorer, x[0], 2, mask=torch.ones(6), offsets=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="offsets must rise from 0 to T = 6"):
        maskattn.chunked_attention_pool(scorer, x[0], 2, offsets=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="offsets must rise from 0 to T = 6"):
        maskattn.chunked_attention_pool(scorer, x[0], 2, offsets=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"mask must be \(2, 6\)"):
        maskattn.chunked_attention_pool(scorer, x, 2, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="features must be"):
        maskattn.chunked_attention_pool(scorer, x[None], 2)


# ------------------------------------------------------------------ memory


def test_checkpointed_driver_saves_no_per_row_activations():
    """Everything the autograd graph keeps outside the checkpoints, in bytes, excluding the
    features themselves: O(N) for the scores / weights, not O(N * hidden) for the scoring network."""
    N, D, H = 2000, 16, 64
    x = torch.randn(N, D, dtype=F64)
    scorer = GatedScorer(D, hidden=H).to(dtype=F64)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(seen.values()), out

    unchunked, _ = saved_bytes(lambda: maskattn.masked_attention_pool(scorer(x)[None], x[None]))
    chunked, out = saved_bytes(lambda: maskattn.chunked_attention_pool(scorer, x, 250))
    assert unchunked >= 3 * N * H * 8  # tanh, sigmoid, their product
    assert chunked <= 8 * N * 8, (chunked, unchunked)  # a few [N] vectors
    out[0].sum().backward()  # and the graph still runs
    assert all(p.grad is not None for p in scorer.parameters())


_RSS_CHILD = textwrap.dedent(
    """
    import sys, torch, maskattn
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    N, D, H, chunk = int(sys.argv[1]), int(sys.argv[2]), 256, int(sys.argv[3])
    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(D, H), torch.nn.Linear(D, H), torch.nn.Linear(H, 1)
    score = lambda x: c(torch.tanh(a(x)) * torch.sigmoid(b(x))).squeeze(-1)
    # One small call of each first: what torch loads or sets up lazily on a first backward (tens of
    # MiB in some builds) is no part of either driver's peak.
    w = torch.randn(2 * chunk, D)
    maskattn.chunked_attention_pool(score, w, chunk)[0].sum().backward()
    maskattn.masked_attention_pool(score(w)[None], w[None])[0].sum().backward()
    del w
    x = torch.randn(N, D)
    base = status("VmRSS")
    pooled, _ = maskattn.chunked_attention_pool(score, x, chunk)
    pooled.sum().backward()
    chunked = status("VmHWM") - base
    # the high-water mark only rises, so the unchunked run comes second
    pooled, _ = maskattn.masked_attention_pool(score(x)[None], x[None])
    pooled.sum().backward()
    print(chunked, status("VmHWM") - base, x.nbytes)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_of_chunked_fwd_bwd_stays_near_the_features():
    """Peak resident memory of fwd+bwd above a process that already holds the features (one bag of
    100,000 x 256 float32, CLAM's gated attention of hidden size 256): the chunked driver adds at
    most 25 % of the features plus 16 MiB for the allocator's and autograd's bookkeeping; the
    unchunked composition adds more than twice the features (so the bound can fail)."""
    N, D, chunk = 100_000, 256, 2048
    # glibc's malloc raises its mmap threshold each time a large block is freed, after which
    # freed chunk activations stay in the heap and the peak depends on how the heap fragments
    # (benchmarks/mil_huge_bag_memory.py shows both); fixed at glibc's initial 128 KiB, every large
    # block goes back to the system when freed, and the peak is what the program holds.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(N), str(D), str(chunk)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    chunked, unchunked, nbytes = map(int, out.stdout.split())
    assert unchunked > 2 * nbytes, (unchunked, nbytes)
    assert chunked <= 0.25 * nbytes + 16 * 2**20, (chunked, unchunked, nbytes)
