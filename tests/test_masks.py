"""Geometric and content-based face masks (maskattn.masks) and the FaceMask transform."""

import math

import pytest
import torch
from conftest import requires_cuda
from reference_foreground_mask import reference_content_mask

from maskattn import masks
from maskattn.bench.foreground_mask import synthetic_faces
from maskattn.transforms import FaceMask, apply_face_mask

# ---------------------------------------------------------------- geometric


@pytest.mark.parametrize("h,w", [(224, 224), (256, 192), (101, 77)])
def test_geometric_coverage_fractions(h, w):
    # Areas of the continuous shapes: pi*ax*ay and fx*fy; pixel sampling is within a perimeter's worth.
    tol = 4.0 / min(h, w)
    assert masks.ellipse(h, w).mean().item() == pytest.approx(math.pi * 0.35 * 0.40, abs=tol)
    assert masks.rectangle(h, w).mean().item() == pytest.approx(0.70 * 0.80, abs=tol)
    assert masks.ellipse(h, w, ax=0.2, ay=0.3).mean().item() == pytest.approx(math.pi * 0.2 * 0.3, abs=tol)
    assert masks.rectangle(h, w, fx=0.5, fy=0.25).mean().item() == pytest.approx(0.5 * 0.25, abs=tol)
    a = masks.adaptive(h, w)
    assert a.mean().item() == pytest.approx(math.pi * 0.14 + 0.5 * (0.56 - math.pi * 0.14), abs=tol)


def test_geometric_shapes_are_centred_and_symmetric():
    for m in (masks.ellipse(64, 48), masks.rectangle(64, 48), masks.adaptive(64, 48), masks.ellipse(63, 47)):
        assert torch.equal(m, m.flip(0)) and torch.equal(m, m.flip(1))
    e = masks.ellipse(200, 100)
    # semi-axes: 0.35*100 = 35 px horizontally, 0.40*200 = 80 px vertically
    cols = e.any(0).nonzero().flatten()
    rows = e.any(1).nonzero().flatten()
    assert cols.max() - cols.min() + 1 == 70 and rows.max() - rows.min() + 1 == 160
    r = masks.rectangle(100, 200)
    assert r.sum(1).max().item() == 140 and r.sum(0).max().item() == 80


def test_adaptive_semantics():
    h, w = 120, 100
    a, e, r = masks.adaptive(h, w), masks.ellipse(h, w), masks.rectangle(h, w)
    assert torch.equal(a[e.bool()], torch.ones(int(e.sum())))
    assert torch.all(a[(r.bool()) & ~e.bool()] == 0.5)
    assert torch.all(a[~r.bool()] == 0)
    assert torch.equal(masks.adaptive(h, w, extension=1.0), torch.maximum(e, r))
    assert torch.equal(masks.adaptive(h, w, dtype=torch.bool), r.bool())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8]
)
def test_geometric_dtypes(dtype):
    for fn in (masks.ellipse, masks.rectangle):
        m = fn(32, 40, dtype=dtype)
        assert m.dtype == dtype and m.shape == (32, 40)
        assert torch.equal(m.to(torch.float32), fn(32, 40))


@requires_cuda
def test_geometric_cuda():
    for fn in (masks.ellipse, masks.rectangle, masks.adaptive):
        assert torch.equal(fn(50, 60, device="cuda").cpu(), fn(50, 60))


def test_geometric_errors():
    with pytest.raises(ValueError, match="ax"):
        masks.ellipse(10, 10, ax=0)
    with pytest.raises(ValueError, match="h and w"):
        masks.rectangle(-1, 10)
    with pytest.raises(ValueError, match="extension"):
        masks.adaptive(10, 10, extension=2.0)
    with pytest.raises(ValueError, match="kind"):
        masks.geometric("circle", 10, 10)
    assert masks.ellipse(0, 5).shape == (0, 5)


# ---------------------------------------------------------------- content-based


def test_content_based_recovers_synthetic_faces():
    imgs, faces = synthetic_faces(6, 128, 128, channels=3, seed=3, salt=0.01)
    soft, cov, ok = masks.content_based(imgs, return_info=True)
    assert ok.all()
    assert soft.dtype == torch.float32 and soft.shape == (6, 128, 128)
    assert soft.min() >= 0 and soft.max() <= 1
    binary = masks.content_based(imgs, sigma=0)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    for b in range(6):
        m, f = binary[b].bool(), faces[b]
        iou = (m & f).sum() / (m | f).sum()
        assert iou > 0.97, iou
        # the dark hole inside the face is filled (it is within the true face region)
        assert m[f].float().mean() > 0.985
        # the separate blob (top-left corner) and all salt noise away from the face are dropped
        assert not m[:20, :20].any()
        far = ~torch.nn.functional.max_pool2d(f[None, None].float(), 9, 1, 4)[0, 0].bool()
        assert not m[far].any()
    assert torch.allclose(cov, binary.mean((1, 2)))


def test_content_based_matches_reference():
    imgs, _ = synthetic_faces(3, 96, 80, channels=1, seed=5, salt=0.02)
    got, cov, _ = masks.content_based(imgs, fallback=None, return_info=True)
    ref, rcov = reference_content_mask(imgs)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, rcov)


def test_hole_and_blob_switches():
    imgs, faces = synthetic_faces(2, 96, 96, channels=1, seed=7, salt=0.0)
    no_fill = masks.content_based(imgs, sigma=0, fill_holes=False, fallback=None)
    filled = masks.content_based(imgs, sigma=0, fallback=None)
    # without filling, the hole stays background inside the face
    assert (filled - no_fill).sum((1, 2)).min() > 20
    assert torch.all(filled >= no_fill)


@pytest.mark.parametrize("fallback", ["ellipse", "rectangle", "adaptive"])
def test_blank_and_full_images_fall_back(fallback):
    imgs, _ = synthetic_faces(4, 64, 64, channels=3, seed=1)
    imgs[1] = 0  # blank: nothing above the threshold
    imgs[2] = 200  # all foreground: coverage 1 > 0.8
    imgs[3] = 0
    imgs[3, :, 30:34, 30:34] = 255  # a 4x4 speck: coverage < 0.1
    out, cov, ok = masks.content_based(imgs, fallback=fallback, return_info=True)
    assert ok.tolist() == [True, False, False, False]
    assert cov[1] == 0 and cov[2] == 1
    fb = masks.geometric(fallback, 64, 64)
    for b in (1, 2, 3):
        assert torch.equal(out[b], fb)
    none = masks.content_based(imgs, fallback=None)
    assert torch.all(none[1] == 0) and torch.all(none[2] == 1)
    custom = torch.full((64, 64), 0.25)
    assert torch.all(masks.content_based(imgs, fallback=custom)[1] == 0.25)
    per_image = torch.rand(4, 64, 64)
    assert torch.equal(masks.content_based(imgs, fallback=per_image)[2], per_image[2])


def test_coverage_bounds():
    imgs, _ = synthetic_faces(2, 64, 64, channels=1, seed=2)
    _, cov, ok = masks.content_based(imgs, return_info=True)
    lo = float(cov.min()) + 1e-3
    _, _, ok2 = masks.content_based(imgs, min_coverage=lo, return_info=True)
    assert ok.all() and ok2.sum() == 1
    with pytest.raises(ValueError, match="min_coverage"):
        masks.content_based(imgs, min_coverage=0.9, max_coverage=0.1)
    with pytest.raises(ValueError, match="fallback"):
        masks.content_based(imgs, fallback=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="images"):
        masks.content_based(torch.zeros(64, 64))


# ---------------------------------------------------------------- transform


def test_face_mask_transform_tensor_and_batch():
    imgs, faces = synthetic_faces(3, 64, 64, channels=3, seed=4)
    t = FaceMask("content_based")
    one = t(imgs[0])
    assert one.dtype == torch.uint8 and one.shape == imgs[0].shape
    batch = t(imgs)
    assert torch.equal(batch[0], one)
    m = masks.content_based(imgs)
    expect = (imgs.float() * m[:, None]).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(batch, expect)
    # background value, float images, geometric kinds
    f = imgs.float() / 255
    out = FaceMask("ellipse", background=-1.0)(f)
    e = masks.ellipse(64, 64)
    torch.testing.assert_close(out, f * e + (-1.0) * (1 - e))
    assert torch.equal(FaceMask("rectangle")(f[0, 0]), f[0, 0] * masks.rectangle(64, 64))


def test_face_mask_transform_numpy():
    np = pytest.importorskip("numpy")
    imgs, _ = synthetic_faces(1, 64, 64, channels=3, seed=4)
    hwc = imgs[0].permute(1, 2, 0).numpy().copy()
    out = FaceMask()(hwc)
    assert isinstance(out, np.ndarray) and out.shape == hwc.shape and out.dtype == np.uint8
    assert np.array_equal(out, FaceMask()(imgs[0]).permute(1, 2, 0).numpy())


def test_face_mask_transform_errors():
    with pytest.raises(ValueError, match="mask_type"):
        FaceMask("circle")
    with pytest.raises(ValueError, match="content_based"):
        FaceMask("ellipse", sigma=2.0)
    with pytest.raises(TypeError, match="FaceMask"):
        FaceMask()([1, 2, 3])


def test_apply_face_mask_blends_soft_edges():
    img = torch.full((1, 4, 4), 100, dtype=torch.uint8)
    m = torch.full((4, 4), 0.5)
    assert torch.all(apply_face_mask(img, m, background=20) == 60)
