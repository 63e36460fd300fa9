"""Property tests: foreground_mask against the dense-tensor reference of
tests/reference_foreground_mask.py over generated sizes, thresholds, radii, dtypes, layouts and
devices."""

import torch
from _props import (
    examples,
    layout,
    st_device,
    st_seed,
)
from hypothesis import given
from hypothesis import strategies as st
from reference_foreground_mask import reference_content_mask

import maskattn


def _blobs(B, C, H, W, g):
    x = torch.rand(B, 1, H // 3 + 1, W // 3 + 1, generator=g)
    x = (
        torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        if B
        else torch.zeros(0, 1, H, W)
    )
    x = (x + 0.2 * torch.rand(B, 1, H, W, generator=g) > 0.6).double() * (
        0.2 + 0.8 * torch.rand(B, 1, H, W, generator=g)
    )
    return x.expand(B, C, H, W)


@st.composite
def fg_case(draw):
    sigma = draw(st.sampled_from([0.0, 0.7, 1.0]))
    # the reference's reflect padding needs the image wider than the Gaussian's radius
    lo = 1 if sigma == 0 else 4
    return (
        draw(st.integers(0, 2)),
        draw(st.sampled_from([None, 1, 2, 3, 4])),
        draw(st.integers(lo, 20)),
        draw(st.integers(lo, 20)),
        draw(st.sampled_from([torch.uint8, torch.float32, torch.float64])),
        draw(st.sampled_from([0.1, 0.3])),
        draw(st.integers(0, 2)),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        sigma,
        draw(st.sampled_from(["contiguous", "offset", "channels_last"])),
        draw(st_device),
        draw(st_seed),
    )


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
