"""Property tests: masked_softmax against a float64 reference over generated score shapes (zero sizes
included), broadcast mask shapes (fewer dims, size-1 dims), every mask kind and dtype, dims, scales,
strides and storage offsets, dtypes and devices; forward and gradient. HYPOTHESIS_PROFILE=long for a
long run."""

import torch
from _props import (
    TOL,
    as_mask_dtype,
    close,
    examples,
    grad_or_zero,
    leaf,
    random_mask,
    st_device,
    st_dtype,
    st_layout,
    st_mask_dtype,
    st_mask_kind,
    st_seed,
)
from hypothesis import given
from hypothesis import strategies as st

import maskattn


def reference_masked_softmax(scores, mask, dim, scale):
    """softmax(scale * scores) over the valid positions, in float64; a slice with no valid position
    is all zeros (with zero gradient)."""
    x = scores.double() * scale
    m = torch.broadcast_to(mask != 0, x.shape)
    any_valid = m.any(dim, keepdim=True)
    z = torch.where(m, x, float("-inf"))
    z = torch.where(any_valid, z, 0.0)  # keeps the empty slices finite (their result is zeroed below)
    return torch.where(m, torch.softmax(z, dim), 0.0)


@st.composite
def softmax_case(draw):
    nd = draw(st.integers(1, 4))
    shape = [draw(st.integers(0, 4)) for _ in range(nd - 1)] + [draw(st.integers(0, 40))]
    dim = draw(st.integers(-nd, nd - 1))
    shape[dim] = draw(st.sampled_from([shape[dim], 1, 33]))  # the softmax dim: sometimes long, sometimes 1
    mnd = draw(st.integers(1, nd))
    # each trailing dim of the mask is the scores' size or 1 (broadcast); leading dims may be absent
    mshape = [draw(st.sampled_from([1, s])) for s in shape[nd - mnd :]]
    return (
        tuple(shape),
        dim,
        tuple(mshape),
        draw(st_mask_kind),
        draw(st_mask_dtype),
        draw(st_dtype),
        draw(st_layout),
        draw(st.sampled_from([1.0, 0.125, 2.5])),
        draw(st_device),
        draw(st_seed),
    )


@examples(60)
@given(softmax_case())
def test_masked_softmax_matches_reference(case):
    shape, dim, mshape, mkind, mdtype, dtype, lay, scale, device, seed = case
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    mask = as_mask_dtype(random_mask(mshape, mkind, g), mdtype)
    x = leaf(scores.to(device), lay)
    y = maskattn.masked_softmax(x, mask.to(device), dim, scale)
    assert y.shape == scores.shape and y.dtype == dtype and y.device.type == device
    xr = scores.double().requires_grad_()
    yr = reference_masked_softmax(xr, mask, dim, scale)
    tol = TOL[dtype]
    close(y, yr, tol, "probs")
    # masked positions are exactly zero, whatever the dtype
    assert (y.cpu()[~torch.broadcast_to(mask != 0, shape)] == 0).all()
    if y.numel() == 0:
        return
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    (y.double().cpu() * go).sum().backward()
    (yr * go).sum().backward()
    # scale multiplies the gradient: compare relative to it
    close(x.grad, grad_or_zero(xr), 4 * tol * max(scale, 1.0), "grad scores")
