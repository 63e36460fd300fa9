"""torch.ops.maskattn.foreground_mask: parity with a dense-tensor reference and with OpenCV,
every input layout and dtype, determinism, edge cases, errors and torch.compile (opcheck: test_op_registry.py)."""

import pytest
import torch
from conftest import requires_cuda
from reference_foreground_mask import reference_content_mask

import maskattn
from maskattn.bench.foreground_mask import opencv_content_mask, synthetic_faces

op = torch.ops.maskattn.foreground_mask


def _random_blobs(B, H, W, seed, C=1, dtype=torch.uint8):
    """Random smooth blobs plus noise: many components of similar size, holes, edge contact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, H // 4 + 1, W // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(B, 1, H, W, generator=g)
    x = (x > 0.62).float() * (0.2 + 0.8 * torch.rand(B, 1, H, W, generator=g))
    x = x.expand(B, C, H, W)
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype).contiguous()


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(threshold=0.3, open_radius=0, close_radius=1, fill_holes=False, sigma=0.0),
        dict(open_radius=2, close_radius=0, sigma=0.7),
        dict(open_radius=0, close_radius=3, sigma=2.0),
    ],
)
def test_matches_reference(params):
    imgs = _random_blobs(3, 48, 61, seed=0)
    mask, cov = op(imgs, *_args(params))
    ref, rcov = reference_content_mask(
        imgs,
        params.get("threshold", 0.1),
        params.get("open_radius", 1),
        params.get("close_radius", 2),
        params.get("fill_holes", True),
        params.get("sigma", 1.0),
    )
    assert mask.dtype == torch.float32 and mask.shape == (3, 48, 61) and cov.shape == (3,)
    torch.testing.assert_close(mask, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, rcov)


def _args(p):
    return (
        p.get("threshold", 0.1),
        p.get("open_radius", 1),
        p.get("close_radius", 2),
        p.get("fill_holes", True),
        p.get("sigma", 1.0),
    )


def test_matches_opencv_pipeline():
    pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    imgs, _ = synthetic_faces(4, 96, 112, channels=1, seed=11, salt=0.01)
    blobs = _random_blobs(4, 96, 112, seed=2)
    for batch in (imgs[:, 0], blobs[:, 0]):
        mask, cov = op(batch)
        for b in range(batch.shape[0]):
            soft, c, _ = opencv_content_mask(batch[b].numpy())
            assert cov[b].item() == pytest.approx(c, abs=1e-7)
            np.testing.assert_allclose(mask[b].numpy(), soft, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_agree(dtype):
    u8 = _random_blobs(2, 40, 40, seed=3)
    # values chosen away from the threshold so that rounding to half types cannot flip a pixel
    x = u8 if dtype == torch.uint8 else (u8.to(torch.float64) / 255).to(dtype)
    m, c = op(x)
    m8, c8 = op(u8)
    assert torch.equal(m, m8) and torch.equal(c, c8)


def test_channels_and_layouts():
    rgb = _random_blobs(2, 40, 52, seed=4, C=3).contiguous()
    rgb[:, 1] = (rgb[:, 1].float() * 0.5).to(torch.uint8)  # channels differ: the luma mix matters
    m, c = op(rgb)
    ref, rc = reference_content_mask(rgb)
    torch.testing.assert_close(m, ref, atol=1e-6, rtol=0)
    # channels-last, a permuted [B,H,W,C] view, and a strided crop read in place
    assert torch.equal(op(rgb.to(memory_format=torch.channels_last))[0], m)
    hwc = rgb.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(op(hwc.permute(0, 3, 1, 2))[0], m)
    big = torch.zeros(2, 3, 60, 80, dtype=torch.uint8)
    big[:, :, 5:45, 10:62] = rgb
    assert torch.equal(op(big[:, :, 5:45, 10:62])[0], m)
    # [B,H,W] is one channel; 1 channel == 3 equal channels; 2 channels are averaged; RGBA ignores alpha
    g = rgb[:, 0]
    assert torch.equal(op(g)[0], op(g[:, None])[0])
    assert torch.equal(op(g[:, None].expand(2, 3, 40, 52))[0], op(g)[0])
    two = torch.stack([g, torch.zeros_like(g)], 1)
    torch.testing.assert_close(op(two)[0], reference_content_mask(two)[0], atol=1e-6, rtol=0)
    rgba = torch.cat([rgb, torch.full_like(rgb[:, :1], 255)], 1)
    assert torch.equal(op(rgba)[0], m)


def test_deterministic_and_thread_invariant():
    imgs, _ = synthetic_faces(5, 64, 64, channels=3, seed=8)
    a = op(imgs)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = op(imgs)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # batch composition does not matter
    assert torch.equal(op(imgs[2:3])[0][0], a[0][2])


def test_largest_component_tie_and_edges():
    # two equal squares: the first in raster order wins; a component touching the border is kept whole
    x = torch.zeros(1, 20, 20, dtype=torch.uint8)
    x[0, 12:17, 2:7] = 255
    x[0, 2:7, 12:17] = 255
    m, c = op(x, 0.1, 0, 0, True, 0.0)
    assert m[0, 2:7, 12:17].all() and not m[0, 12:17, 2:7].any() and c.item() == 25 / 400
    x = torch.zeros(1, 10, 10, dtype=torch.uint8)
    x[0, :, :3] = 255
    m, _ = op(x, 0.1, 1, 2, True, 0.0)
    assert torch.equal(m[0].bool(), x[0].bool())  # erosion ignores pixels outside the image
    # diagonal neighbours are connected (8-connectivity); a ring's hole is filled, a C's opening is not
    d = torch.zeros(1, 6, 6, dtype=torch.uint8)
    for i in range(6):
        d[0, i, i] = 255
    assert op(d, 0.1, 0, 0, False, 0.0)[1].item() == pytest.approx(6 / 36)
    ring = torch.zeros(1, 9, 9, dtype=torch.uint8)
    ring[0, 2:7, 2:7] = 255
    ring[0, 4, 4] = 0
    assert op(ring, 0.1, 0, 0, True, 0.0)[1].item() == pytest.approx(25 / 81)
    ring[0, 4, 4:7] = 0  # opened to the outside through a 4-connected channel
    assert op(ring, 0.1, 0, 0, True, 0.0)[1].item() == pytest.approx(22 / 81)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 1, 0, 5), (2, 1, 5, 0), (1, 1, 1, 1), (2, 1, 1, 9), (2, 3, 7, 1)])
def test_degenerate_shapes(shape):
    x = torch.full(shape, 200, dtype=torch.uint8)
    m, c = op(x)
    assert m.shape == (shape[0], shape[2], shape[3]) and c.shape == (shape[0],)
    if m.numel():
        ref, rc = reference_content_mask(x) if min(shape[2:]) > 1 else (None, None)
        assert torch.all((m >= 0) & (m <= 1))
        if ref is not None:
            torch.testing.assert_close(m, ref, atol=1e-6, rtol=0)


def test_errors():
    x = torch.zeros(2, 8, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="images must be"):
        op(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="images must be uint8"):
        op(x.to(torch.int32))
    with pytest.raises(RuntimeError, match="open_radius"):
        op(x, 0.1, -1)
    with pytest.raises(RuntimeError, match="close_radius"):
        op(x, 0.1, 1, 100)
    with pytest.raises(RuntimeError, match="sigma"):
        op(x, 0.1, 1, 2, True, -1.0)
    with pytest.raises(RuntimeError, match="threshold"):
        op(x, float("nan"))


def test_compile_fullgraph():
    imgs, _ = synthetic_faces(2, 48, 48, channels=3, seed=0)
    fn = torch.compile(lambda x: maskattn.masks.content_based(x), fullgraph=True)
    torch.testing.assert_close(fn(imgs), maskattn.masks.content_based(imgs))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
def test_cuda_matches_cpu(dtype):
    imgs, _ = synthetic_faces(4, 100, 90, channels=3, seed=9)
    blobs = _random_blobs(3, 64, 80, seed=1, C=3)
    for x in (imgs, blobs):
        x = x if dtype == torch.uint8 else (x.to(torch.float64) / 255).to(dtype)
        for params in (dict(), dict(open_radius=2, close_radius=0, sigma=2.0, fill_holes=False)):
            m, c = op(x.cuda(), *_args(params))
            mc, cc = op(x, *_args(params))
            torch.testing.assert_close(m.cpu(), mc, atol=1e-6, rtol=0)
            torch.testing.assert_close(c.cpu(), cc)
    out = maskattn.masks.content_based(imgs.cuda().to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.cpu(), maskattn.masks.content_based(imgs), atol=1e-6, rtol=0)
    torch.library.opcheck(op, (imgs.cuda(), 0.1, 1, 2, True, 1.0))


@pytest.mark.parametrize("seed", range(6))
def test_random_binary_patterns_match_reference(seed):
    # Noise-like patterns stress the run labelling: many components, nested holes, diagonal-only
    # contacts, runs touching every border, ties between equal components.
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        H, W = (int(v) for v in torch.randint(1, 24, (2,), generator=g))
        density = float(torch.rand((), generator=g)) * 0.8 + 0.1
        x = (torch.rand(3, H, W, generator=g) < density).to(torch.uint8) * 255
        o, c = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
        fill = bool(torch.randint(0, 2, (), generator=g))
        m, cov = op(x, 0.5, o, c, fill, 0.0)
        ref, rcov = reference_content_mask(x, 0.5, o, c, fill, 0.0)
        assert torch.equal(m, ref), (H, W, o, c, fill)
        torch.testing.assert_close(cov, rcov)
