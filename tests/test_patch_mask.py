import pytest
import torch
from conftest import requires_cuda
from reference_patch_mask import image_mask_to_patch_mask

import maskattn

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
]


def _rand_mask(B, H, W, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, W, generator=g) < p


def _padded_mask(B, H, W, seed=0):
    """Realistic masks: each image valid in a top-left rectangle of random size."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        h = int(torch.randint(1, H + 1, (1,), generator=g))
        w = int(torch.randint(1, W + 1, (1,), generator=g))
        m[b, :h, :w] = True
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_jit_patch_mask_every_dtype(dtype):
    m = _rand_mask(3, 32, 48)
    got = maskattn.patch_mask(m.to(dtype), 8)
    ref = image_mask_to_patch_mask(m.float(), 8).bool()
    assert got.dtype == torch.bool and got.shape == (3, 4 * 6)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("p,H,W", [(16, 256, 256), (14, 224, 112), (4, 12, 36), (1, 5, 3), (7, 7, 7)])
def test_matches_jit_patch_mask_shapes(p, H, W):
    for i, m in enumerate([_rand_mask(2, H, W, seed=1), _padded_mask(4, H, W, seed=2)]):
        assert torch.equal(maskattn.patch_mask(m, p), image_mask_to_patch_mask(m.float(), p).bool()), i


def test_exactly_half_is_padding():
    # 8 of 16 pixels valid: mean == 0.5 is not > 0.5, as in JiT's rule; 9 of 16 is.
    m = torch.zeros(1, 4, 8, dtype=torch.bool)
    m[0, :2, :4] = True
    m[0, :2, 4:] = True
    m[0, 2, 4] = True
    assert maskattn.patch_mask(m, 4).tolist() == [[False, True]]


def test_threshold_rules():
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m.view(-1)[:30] = True  # 30 of 100 valid
    assert maskattn.patch_mask(m, 10, 0.29).item()
    assert not maskattn.patch_mask(m, 10, 0.3).item()  # strictly greater
    assert maskattn.patch_mask(m, 10, 0.0).item()  # any valid pixel
    assert not maskattn.patch_mask(torch.zeros(1, 10, 10), 10, 0.0).item()
    assert not maskattn.patch_mask(torch.ones(1, 10, 10), 10, 1.0).item()
    mk = _rand_mask(2, 16, 16, p=0.1, seed=5)
    assert torch.equal(maskattn.patch_mask(mk, 4, 0.0), mk.reshape(2, 4, 4, 4, 4).any(4).any(2).reshape(2, -1))


def test_float_mask_counts_nonzero():
    m = torch.full((1, 2, 2), 0.3)  # "soft" valid pixels: all nonzero, so all valid
    assert maskattn.patch_mask(m, 2).item()


def test_strided_and_channel_inputs():
    m = _rand_mask(2, 64, 32, seed=3)
    ref = image_mask_to_patch_mask(m.float(), 8).bool()
    t = m.transpose(1, 2).contiguous().transpose(1, 2)  # column-major
    assert not t.is_contiguous()
    assert torch.equal(maskattn.patch_mask(t, 8), ref)
    big = _rand_mask(2, 128, 64, seed=3)
    big[:, ::2, ::2] = m
    assert torch.equal(maskattn.patch_mask(big[:, ::2, ::2], 8), ref)
    assert torch.equal(maskattn.patch_mask(m.unsqueeze(1).float(), 8), ref)
    assert torch.equal(maskattn.patch_mask(m[:1].expand(3, 64, 32), 8), ref[:1].expand(3, -1))


def test_empty_batch():
    assert maskattn.patch_mask(torch.ones(0, 8, 8), 4).shape == (0, 4)


def test_errors_name_argument():
    with pytest.raises(RuntimeError, match=r"H = 30 and width W = 32.*patch_size = 16"):
        maskattn.patch_mask(torch.ones(1, 30, 32), 16)
    with pytest.raises(RuntimeError, match=r"H = 32 and width W = 20"):
        maskattn.patch_mask(torch.ones(1, 32, 20), 16)
    with pytest.raises(RuntimeError, match="image_mask must be"):
        maskattn.patch_mask(torch.ones(32, 32), 16)
    with pytest.raises(RuntimeError, match="patch_size must be positive"):
        maskattn.patch_mask(torch.ones(1, 32, 32), 0)
    with pytest.raises(RuntimeError, match="threshold"):
        maskattn.patch_mask(torch.ones(1, 32, 32), 16, 1.5)


def test_inverse_roundtrip():
    m = _padded_mask(3, 32, 48, seed=7)
    pm = maskattn.patch_mask(m, 8)
    img = maskattn.patch_mask_to_image(pm, 8, (32, 48))
    assert img.shape == (3, 32, 48) and img.dtype == torch.bool
    assert torch.equal(maskattn.patch_mask(img, 8), pm)
    assert torch.equal(img.reshape(3, 4, 8, 6, 8)[:, :, 3, :, 5].reshape(3, -1), pm)
    with pytest.raises(ValueError, match="patch_mask must be"):
        maskattn.patch_mask_to_image(pm, 8, 32)


def test_compile():
    # opcheck runs for every op in tests/test_op_registry.py
    m = _rand_mask(2, 16, 24, seed=4)
    f = torch.compile(lambda x: maskattn.patch_mask(x, 4).sum(1), fullgraph=True)
    assert torch.equal(f(m), maskattn.patch_mask(m, 4).sum(1))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    m = _padded_mask(5, 64, 96, seed=8).to(dtype)
    for p, t in [(16, 0.5), (8, 0.0), (32, 0.25)]:
        assert torch.equal(maskattn.patch_mask(m.cuda(), p, t).cpu(), maskattn.patch_mask(m, p, t))
    assert torch.equal(
        maskattn.patch_mask(m.cuda().transpose(1, 2), 16).cpu(), maskattn.patch_mask(m.transpose(1, 2), 16)
    )


@pytest.mark.parametrize("threshold", [0.5, 0.9999999, 1.0])
def test_patch_of_more_than_2_31_pixels_counts_in_64_bits(threshold):
    # One 46341 x 46341 patch holds 46341^2 = 2^31 + 4633 pixels: a 32-bit count wraps negative
    # and calls the all-valid patch invalid. The image is a zero-stride view of one valid row, so
    # the test reads 2^31 bytes through the strides without allocating them (a few seconds on the
    # CPU). The CUDA kernel counts in int64 too, but one thread per patch would take far longer
    # over 2^31 pixels, so this runs on the CPU only.
    p = 46341
    assert p * p > 2**31
    image = torch.ones(1, 1, p, dtype=torch.bool).expand(1, p, p)
    assert image.stride() == (p, 0, 1)
    got = maskattn.patch_mask(image, p, threshold)
    # valid iff count > threshold * p^2 with count = p^2, in exact integer arithmetic
    expected = p * p > threshold * p * p
    assert got.shape == (1, 1) and bool(got[0, 0]) == expected
