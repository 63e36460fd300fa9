"""Property tests: masked_attention_pool against the reference over generated shapes, masks,
dtypes, strides and storage offsets. Fixed seed and bounded examples keep CI fast; set
HYPOTHESIS_PROFILE=long for a long run."""

import torch
from _props import TOL, layout, st_device  # registers and loads the hypothesis profiles
from hypothesis import given
from hypothesis import strategies as st
from reference_masked_attention_pool import reference_pool, reference_pool_packed

import maskattn


def _layout(t, kind, draw_offset):
    return layout(t, kind, draw_offset)


@st.composite
def pool_case(draw):
    B = draw(st.integers(0, 4))
    N = draw(st.integers(0, 40))
    D = draw(st.integers(0, 33))
    K = draw(st.sampled_from([None, 1, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    mask_kind = draw(st.sampled_from(["none", "all", "empty", "random"]))
    flay = draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset"]))
    llay = draw(st.sampled_from(["contiguous", "transposed", "offset"]))
    seed = draw(st.integers(0, 2**16))
    off = draw(st.integers(1, 7))
    device = draw(st_device)
    return B, N, D, K, dtype, mask_kind, flay, llay, seed, off, device


@given(pool_case())
def test_pool_matches_reference(case):
    B, N, D, K, dtype, mask_kind, flay, llay, seed, off, device = case
    g = torch.Generator().manual_seed(seed)
    lshape = (B, N) if K is None else (B, N, K)
    logits = (torch.randn(lshape, generator=g) * 3).to(dtype)
    feats = torch.randn(B, N, D, generator=g).to(dtype)
    mask = {
        "none": None,
        "all": torch.ones(B, N, dtype=torch.bool),
        "empty": torch.zeros(B, N, dtype=torch.uint8),
        "random": torch.rand(B, N, generator=g) < 0.5,
    }[mask_kind]
    l = _layout(logits.to(device), llay, off).detach().requires_grad_()  # a leaf that keeps the strides
    f = _layout(feats.to(device), flay, off).detach().requires_grad_()
    assert l.stride() == _layout(logits, llay, off).stride()
    pooled, weights = maskattn.masked_attention_pool(l, f, None if mask is None else mask.to(device))
    lr = logits.double().requires_grad_()
    fr = feats.double().requires_grad_()
    pr, wr = reference_pool(lr, fr, mask)
    tol = TOL[dtype]
    pooled, weights = pooled.cpu(), weights.cpu()
    torch.testing.assert_close(pooled.double(), pr, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.double(), wr, atol=tol, rtol=tol)
    if pooled.numel() + weights.numel() == 0:
        return
    gp = torch.randn(pr.shape, generator=g, dtype=torch.float64)
    gw = torch.randn(wr.shape, generator=g, dtype=torch.float64)
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    ((pr * gp).sum() + (wr * gw).sum()).backward()
    gtol = 4 * tol
    # with N == 0 the reference's graph never reaches its inputs: their gradient is zero
    lg = lr.grad if lr.grad is not None else torch.zeros_like(lr)
    fg = fr.grad if fr.grad is not None else torch.zeros_like(fr)
    torch.testing.assert_close(l.grad.double().cpu(), lg, atol=gtol, rtol=gtol)
    torch.testing.assert_close(f.grad.double().cpu(), fg, atol=gtol, rtol=gtol)


@given(
    st.lists(st.integers(0, 30), min_size=0, max_size=5),
    st.integers(0, 17),
    st.sampled_from([None, 2]),
    st.integers(0, 2**16),
)
def test_packed_matches_reference(lengths, D, K, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    logits = torch.randn((T,) if K is None else (T, K), generator=g, dtype=torch.float64)
    feats = torch.randn(T, D, generator=g, dtype=torch.float64)
    pooled, weights = maskattn.masked_attention_pool_packed(logits, feats, offsets)
    pr, wr = reference_pool_packed(logits, feats, offsets)
    assert pooled.shape == ((len(lengths), D) if K is None else (len(lengths), K, D))
    torch.testing.assert_close(pooled, pr.reshape(pooled.shape))
    torch.testing.assert_close(weights, wr.reshape(weights.shape))
