"""Property tests: gated_masked_mean against the unfused reference (forward and both gradients) and
foreground_mask against the dense-tensor reference of tests/reference_face.py, over generated sizes
(B=0, C=0, one pixel), masks of every kind and dtype, layouts (channels-last, sliced, storage offset),
dtypes and devices."""
import torch
from hypothesis import given, strategies as st

import maskattn
from reference_face import reference_content_mask, reference_gated_masked_mean
from _props import (TOL, as_mask_dtype, close, examples, grad_or_zero, layout, random_mask, st_device, st_dtype,
                    st_mask_dtype, st_seed)


@st.composite
def gmm_case(draw):
    return (draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
            draw(st.booleans()), draw(st.sampled_from(["none", "all", "empty", "random"])), draw(st_mask_dtype),
            draw(st_dtype), draw(st.sampled_from(["contiguous", "channels_last", "sliced", "offset"])),
            draw(st.sampled_from(["contiguous", "transposed", "offset"])), draw(st_device), draw(st_seed))


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


def _blobs(B, C, H, W, g):
    x = torch.rand(B, 1, H // 3 + 1, W // 3 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False) if B else \
        torch.zeros(0, 1, H, W)
    x = (x + 0.2 * torch.rand(B, 1, H, W, generator=g) > 0.6).double() * (0.2 + 0.8 * torch.rand(B, 1, H, W, generator=g))
    return x.expand(B, C, H, W)


@st.composite
def fg_case(draw):
    sigma = draw(st.sampled_from([0.0, 0.7, 1.0]))
    # the reference's reflect padding needs the image wider than the Gaussian's radius
    lo = 1 if sigma == 0 else 4
    return (draw(st.integers(0, 2)), draw(st.sampled_from([None, 1, 2, 3, 4])), draw(st.integers(lo, 20)),
            draw(st.integers(lo, 20)), draw(st.sampled_from([torch.uint8, torch.float32, torch.float64])),
            draw(st.sampled_from([0.1, 0.3])), draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.booleans()),
            sigma, draw(st.sampled_from(["contiguous", "offset", "channels_last"])), draw(st_device), draw(st_seed))


@examples(15)
@given(fg_case())
def test_foreground_mask_matches_reference(case):
    B, C, H, W, dtype, threshold, ro, rc, fill, sigma, lay, device, seed = case
    g = torch.Generator().manual_seed(seed)
    x = _blobs(B, C or 1, H, W, g)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    if C is None:
        x = x[:, 0]
    xd = x.to(device)
    if lay == "channels_last" and x.dim() == 4:
        xd = xd.contiguous(memory_format=torch.channels_last)
    else:
        xd = layout(xd, "offset" if lay != "contiguous" else "contiguous")
    mask, cov = maskattn.foreground_mask(xd, threshold, ro, rc, fill, sigma)
    ref, rcov = reference_content_mask(x.contiguous(), threshold, ro, rc, fill, sigma)
    assert mask.dtype == torch.float32 and mask.shape == (B, H, W) and cov.shape == (B,)
    torch.testing.assert_close(mask.cpu(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov.cpu(), rcov)
