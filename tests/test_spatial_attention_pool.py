"""nn.SpatialAttentionPool: the thermal-face classifier's spatial-attention gate, fused."""

import pytest
import torch
from reference_gated_masked_mean import ThermalFaceSpatialAttention, reference_gated_masked_mean

import maskattn
from maskattn.nn import SpatialAttentionPool

op = torch.ops.maskattn.gated_masked_mean
bwd = torch.ops.maskattn._gated_masked_mean_backward

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _inputs(B=3, C=5, H=4, W=6, dtype=torch.float64, seed=0, mask_p=0.6):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    l = torch.randn(B, 1, H, W, generator=g, dtype=torch.float64).to(dtype)
    m = torch.rand(B, H, W, generator=g) < mask_p
    m[0, 0, 0] = True
    return f, l, m


# ---------------------------------------------------------------- module vs the thermal-face classifier's


@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (3, 8, 5, 9)])
def test_module_matches_thermal_face_attention_forward_and_every_gradient(shape):
    B, C, H, W = shape
    torch.manual_seed(0)
    theirs = ThermalFaceSpatialAttention(C, hidden=12).double()
    ours = SpatialAttentionPool(C, hidden=12).double()
    ours.load_state_dict(theirs.state_dict())  # the classifier's checkpoint loads, strictly
    x1 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    p1, a1 = theirs(x1)
    p2, a2 = ours(x2)
    torch.testing.assert_close(p2, p1)
    torch.testing.assert_close(a2, a1)
    gp, ga = torch.randn_like(p1), torch.randn_like(a1)
    g1 = torch.autograd.grad((p1 * gp).sum() + (a1 * ga).sum(), [x1, *theirs.parameters()])
    g2 = torch.autograd.grad((p2 * gp).sum() + (a2 * ga).sum(), [x2, *ours.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_parameters_are_the_thermal_face_classifiers():
    m = SpatialAttentionPool(512)
    names = [n for n, _ in m.named_parameters()]
    assert names == [
        "attention_conv.0.weight",
        "attention_conv.0.bias",
        "attention_conv.2.weight",
        "attention_conv.2.bias",
    ]
    assert m.attention_conv[0].weight.shape == (256, 512, 3, 3) and m.attention_conv[2].weight.shape == (1, 256, 1, 1)
    x = torch.randn(2, 512, 7, 7)
    torch.testing.assert_close(m(x)[1], m.attention_conv(x))


def test_module_masked_feature_and_image_resolution():
    torch.manual_seed(1)
    m = SpatialAttentionPool(6, hidden=8).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fmask = torch.rand(2, 7, 7) > 0.4
    pooled, att = m(x, fmask)
    ref, ratt = reference_gated_masked_mean(x, m.gate_logits(x), fmask)
    torch.testing.assert_close(pooled, ref)
    torch.testing.assert_close(att, ratt)
    assert torch.all(att[:, 0][~fmask] == 0)
    # image-resolution mask (224 = 7 * 32): reduced by area, valid where > half the cell is valid
    img = torch.zeros(2, 224, 224)
    img[:, 32:160, 64:224] = 1.0
    img[:, 160:176, :] = 1.0  # half a cell row: not > 0.5
    expect = torch.zeros(2, 7, 7, dtype=torch.bool)
    expect[:, 1:5, 2:7] = True
    pooled, att = m(x, img)
    torch.testing.assert_close(pooled, reference_gated_masked_mean(x, m.gate_logits(x), expect)[0])
    assert torch.equal(m.feature_mask(img.bool(), x), expect)
    # soft values count as valid wherever they are nonzero: the pixels are counted, not averaged
    soft = maskattn.masks.adaptive(224, 224).expand(2, 224, 224)
    frac = torch.nn.functional.avg_pool2d((soft != 0).double()[:, None], 32)[:, 0]
    assert torch.equal(m.feature_mask(soft, x), frac > 0.5)
    with pytest.raises(ValueError, match="mask"):
        m(x, torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="features"):
        m(torch.randn(2, 5, 7, 7, dtype=torch.float64))


def test_module_compile_fullgraph():
    torch.manual_seed(0)
    m = SpatialAttentionPool(8, hidden=4)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    mask = torch.rand(2, 7, 7) > 0.3
    cm = torch.compile(m, fullgraph=True)
    p, a = cm(x, mask)
    p0, a0 = m(x, mask)
    torch.testing.assert_close(p, p0)
    torch.testing.assert_close(a, a0)
    g = torch.autograd.grad(p.sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(p0.sum(), x)[0])


# ---------------------------------------------------------------- image-resolution masks: the rule


@pytest.mark.parametrize("threshold", [0.0, 0.29, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16])
def test_image_resolution_mask_is_patch_mask_when_the_sizes_divide(threshold, dtype):
    # 10 x 10 cells: 0.29 * 100 = 28.999999999999996 in binary; patch_mask and the module both
    # read it as "more than 29 of 100 pixels" (a cell with exactly 29 valid pixels is invalid).
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(3, 50, 70, generator=g) < torch.rand(3, 1, 1, generator=g)
    valid[0, :10, :10] = (torch.arange(100) < 29).view(10, 10)  # exactly 29 of 100
    mask = valid.to(dtype) * (0.4 if dtype.is_floating_point else 1)
    m = SpatialAttentionPool(2, hidden=2, mask_threshold=threshold)
    got = m.feature_mask(mask, torch.zeros(3, 2, 5, 7))
    assert got.dtype == torch.bool and got.shape == (3, 5, 7)
    assert torch.equal(got.flatten(1), maskattn.patch_mask(valid, 10, threshold))
    if threshold == 0.29:
        assert not got[0, 0, 0]


@pytest.mark.parametrize("sizes", [(13, 17, 4, 5), (30, 50, 7, 9), (8, 8, 8, 3), (61, 100, 6, 9)])
def test_image_resolution_mask_uneven_sizes_use_adaptive_pooling_cells(sizes):
    # Cells are adaptive_avg_pool2d's regions (overlapping by a pixel where the sizes do not divide);
    # the valid fraction of each is that of the nonzero pixels, in float64 for the reference.
    Hm, Wm, H, W = sizes
    g = torch.Generator().manual_seed(Hm)
    for threshold in (0.0, 0.3, 0.5, 0.9):
        valid = torch.rand(2, Hm, Wm, generator=g) < 0.5
        m = SpatialAttentionPool(2, hidden=2, mask_threshold=threshold)
        ref = torch.nn.functional.adaptive_avg_pool2d(valid.double()[:, None], (H, W))[:, 0] > threshold
        soft = torch.where(valid, torch.rand(2, Hm, Wm, generator=g) - 0.5, torch.zeros(()))  # signed values
        soft[valid & (soft == 0)] = 1
        assert torch.equal(m.feature_mask(valid, torch.zeros(2, 2, H, W)), ref)
        assert torch.equal(m.feature_mask(soft, torch.zeros(2, 2, H, W)), ref)


def test_soft_mask_below_the_threshold_is_still_valid():
    # 0.4 everywhere is valid everywhere (averaging the values would make every cell invalid).
    m = SpatialAttentionPool(3, hidden=2)
    x = torch.randn(2, 3, 4, 4)
    assert m.feature_mask(torch.full((2, 32, 32), 0.4), x).all()
    assert m.feature_mask(torch.full((2, 32, 32), -1.0), x).all()
    assert not m.feature_mask(torch.full((2, 32, 32), -0.0), x).any()
    pooled, att = m(x, torch.full((2, 32, 32), 0.4))
    torch.testing.assert_close(pooled, m(x)[0])
