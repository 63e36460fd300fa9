"""Property tests: patch_mask and patch_mask_to_image against plain-PyTorch references over generated
image sizes (B=0, rectangular, one patch), patch sizes, thresholds, mask dtypes, soft masks, strides
and storage offsets, and devices."""

import torch
from _props import examples, layout, st_device, st_layout, st_seed
from hypothesis import given
from hypothesis import strategies as st

import maskattn


def reference_patch_mask(m, p, threshold):
    """valid where the count of nonzero pixels in the patch is > threshold * p * p"""
    if m.dim() == 4:
        m = m[:, 0]
    B, H, W = m.shape
    counts = (m != 0).to(torch.int64).reshape(B, H // p, p, W // p, p).sum((2, 4))
    return (counts.double() > threshold * p * p).reshape(B, (H // p) * (W // p))


@st.composite
def patch_case(draw):
    p = draw(st.integers(1, 6))
    return (
        draw(st.integers(0, 3)),
        draw(st.integers(0, 4)) * p,
        draw(st.integers(0, 4)) * p,
        p,
        draw(st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0, 1 / 3])),
        draw(st.booleans()),
        draw(
            st.sampled_from(
                [torch.bool, torch.uint8, torch.int32, torch.float32, torch.float64, torch.float16, torch.bfloat16]
            )
        ),
        draw(st.sampled_from(["random", "all", "empty", "rect", "soft"])),
        draw(st_layout),
        draw(st_device),
        draw(st_seed),
    )


@examples(60)
@given(patch_case())
def test_patch_mask_matches_reference(case):
    B, H, W, p, threshold, four_d, mdtype, kind, lay, device, seed = case
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = (torch.rand(B, H, W, generator=g) < torch.rand(B, 1, 1, generator=g)).to(mdtype)
    elif kind == "all":
        m = torch.ones(B, H, W, dtype=mdtype)
    elif kind == "empty":
        m = torch.zeros(B, H, W, dtype=mdtype)
    elif kind == "rect":  # the padded-image case: a valid top-left rectangle per sample
        hh = torch.randint(0, H + 1, (B, 1, 1), generator=g)
        ww = torch.randint(0, W + 1, (B, 1, 1), generator=g)
        m = ((torch.arange(H)[:, None] < hh) & (torch.arange(W) < ww)).to(mdtype)
    else:  # soft float values: counted as valid where nonzero
        m = (torch.rand(B, H, W, generator=g) * (torch.rand(B, H, W, generator=g) < 0.6)).to(
            mdtype if mdtype.is_floating_point else torch.float32
        )
    if four_d:
        m = m.unsqueeze(1)
    x = layout(m.to(device), lay)
    out = maskattn.patch_mask(x, p, threshold)
    ref = reference_patch_mask(m, p, threshold)
    assert out.dtype == torch.bool and out.shape == (B, (H // p) * (W // p))
    assert torch.equal(out.cpu(), ref)
    # the inverse: every pixel of a valid patch, and only those
    img = maskattn.patch_mask_to_image(out, p, (H, W))
    expect = ref.reshape(B, H // p, W // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
    assert img.dtype == torch.bool and torch.equal(img.cpu(), expect)
    if H == W:
        assert torch.equal(maskattn.patch_mask_to_image(out, p, H).cpu(), expect)
    # patch_mask of that image with threshold < 1 gives the patch mask back
    if H and W:
        assert torch.equal(maskattn.patch_mask(img, p, min(threshold, 0.99)).cpu(), ref)
