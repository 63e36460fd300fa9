"""Property tests: masked_attention_pool_packed against the per-bag reference over generated offsets
(empty bags, no bags, T = 0, D = 0), K branches, strides and storage offsets, dtypes and devices;
forward and both gradients."""

import torch
from _props import TOL, close, examples, grad_or_zero, leaf, st_device, st_dtype, st_layout, st_seed
from hypothesis import given
from hypothesis import strategies as st
from reference_masked_attention_pool import reference_pool_packed

import maskattn


@st.composite
def packed_case(draw):
    lengths = draw(st.lists(st.sampled_from([0, 0, 1, 2, 5, 13, 40]), min_size=0, max_size=5))
    return (
        lengths,
        draw(st.integers(0, 33)),
        draw(st.sampled_from([None, 1, 3])),
        draw(st_dtype),
        draw(st_layout),
        draw(st_layout),
        draw(st.integers(1, 7)),
        draw(st_device),
        draw(st_seed),
    )


@examples(60)
@given(packed_case())
def test_packed_matches_reference_forward_and_grads(case):
    lengths, D, K, dtype, llay, flay, off, device, seed = case
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    logits = (torch.randn((T,) if K is None else (T, K), generator=g, dtype=torch.float64) * 3).to(dtype)
    feats = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    l, f = leaf(logits.to(device), llay, off), leaf(feats.to(device), flay, off)
    pooled, weights = maskattn.masked_attention_pool_packed(l, f, offsets.to(device))
    lr, fr = logits.double().requires_grad_(), feats.double().requires_grad_()
    pr, wr = reference_pool_packed(lr, fr, offsets)
    Bn = len(lengths)
    assert pooled.shape == ((Bn, D) if K is None else (Bn, K, D)) and weights.shape == logits.shape
    assert pooled.dtype == dtype and weights.dtype == dtype
    pr = pr.reshape(pooled.shape)
    tol = TOL[dtype]
    close(pooled, pr, tol, "pooled")
    close(weights, wr, tol, "weights")
    if pooled.numel() + weights.numel() == 0:
        return
    gp = torch.randn(pr.shape, generator=g, dtype=torch.float64)
    gw = torch.randn(wr.shape, generator=g, dtype=torch.float64)
    ((pooled.double().cpu() * gp).sum() + (weights.double().cpu() * gw).sum()).backward()
    ((pr * gp).sum() + (wr * gw).sum()).backward()
    close(l.grad, grad_or_zero(lr), 4 * tol, "grad logits")
    close(f.grad, grad_or_zero(fr), 4 * tol, "grad features")
