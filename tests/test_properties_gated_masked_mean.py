"""Property tests: gated_masked_mean against the unfused reference (forward and both gradients) over
generated sizes (B=0, C=0, one pixel), masks of every kind and dtype, layouts (channels-last,
sliced, storage offset), dtypes and devices."""

import torch
from _props import (
    TOL,
    as_mask_dtype,
    close,
    examples,
    grad_or_zero,
    layout,
    random_mask,
    st_device,
    st_dtype,
    st_mask_dtype,
    st_seed,
)
from hypothesis import given
from hypothesis import strategies as st
from reference_gated_masked_mean import reference_gated_masked_mean

import maskattn


@st.composite
def gmm_case(draw):
    return (
        draw(st.integers(0, 3)),
        draw(st.integers(0, 9)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 9)),
        draw(st.booleans()),
        draw(st.sampled_from(["none", "all", "empty", "random"])),
        draw(st_mask_dtype),
        draw(st_dtype),
        draw(st.sampled_from(["contiguous", "channels_last", "sliced", "offset"])),
        draw(st.sampled_from(["contiguous", "transposed", "offset"])),
        draw(st_device),
        draw(st_seed),
    )


@examples(60)
@given(gmm_case())
def test_gated_masked_mean_matches_reference(case):
    B, C, H, W, gate4d, mkind, mdtype, dtype, flay, glay, device, seed = case
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    gl = (torch.randn((B, 1, H, W) if gate4d else (B, H, W), generator=g, dtype=torch.float64) * 2).to(dtype)
    mask = None if mkind == "none" else as_mask_dtype(random_mask((B, H, W), mkind, g), mdtype)
    fd = feats.to(device)
    if flay == "channels_last":
        f = fd.contiguous(memory_format=torch.channels_last)
    else:
        f = layout(fd, flay)
    f = f.detach().requires_grad_()
    l = layout(gl.to(device), glay).requires_grad_()
    pooled, gate = maskattn.gated_masked_mean(f, l, None if mask is None else mask.to(device))
    fr, lr = feats.double().requires_grad_(), gl.double().requires_grad_()
    pr, gr = reference_gated_masked_mean(fr, lr, mask)
    assert pooled.shape == (B, C) and gate.shape == gl.shape and pooled.dtype == dtype
    tol = TOL[dtype]
    close(pooled, pr, tol, "pooled")
    close(gate, gr, tol, "gate")
    if mask is not None:
        assert (gate.cpu().reshape(B, H, W)[mask == 0] == 0).all()  # padding: exactly zero
    if pooled.numel() + gate.numel() == 0:
        return
    gp = torch.randn(pr.shape, generator=g, dtype=torch.float64)
    gg = torch.randn(gr.shape, generator=g, dtype=torch.float64)
    ((pooled.double().cpu() * gp).sum() + (gate.double().cpu() * gg).sum()).backward()
    ((pr * gp).sum() + (gr * gg).sum()).backward()
    close(f.grad, grad_or_zero(fr), 4 * tol, "grad features")
    close(l.grad, grad_or_zero(lr), 4 * tol, "grad gate_logits")
