import pytest
import torch
from conftest import requires_cuda
from reference_masked_softmax import jit_masked_softmax, token_padding_softmax

import maskattn

TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def ref(scores, mask, dim=-1, scale=1.0):
    """JiT's masked_fill(-inf) + softmax in float64, with the NaN of fully masked slices as 0."""
    m = torch.broadcast_to(mask != 0, scores.shape)
    y = jit_masked_softmax(scores.double(), m, scale, dim)
    return torch.where(m, y.nan_to_num(0.0), 0.0)


def key_mask(B, N, p=0.7, seed=0, full_rows=(0,)):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, 1, 1, N, generator=g) < p
    for b in full_rows:
        m[b] = False  # a sample with no valid key
    return m


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("N", [1, 7, 64, 255, 300])
def test_parity_key_mask(dtype, N):
    x = torch.randn(3, 2, 5, N, dtype=dtype) * 3
    m = key_mask(3, N, seed=N)
    y = maskattn.masked_softmax(x, m, scale=0.37)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref(x, m, scale=0.37), **TOL[dtype])
    assert not y.isnan().any()
    assert (y[0] == 0).all()  # fully masked sample: zeros, not NaN, not uniform
    assert (y.masked_select(~m.expand_as(y)) == 0).all()  # padding weight exactly 0


@pytest.mark.parametrize("mask_shape", [(3, 4, 6, 10), (3, 1, 6, 10), (6, 10), (10,), (3, 4, 6, 1), (1, 1, 1, 1)])
def test_broadcast_masks(mask_shape):
    x = torch.randn(3, 4, 6, 10)
    m = torch.rand(mask_shape) < 0.6
    torch.testing.assert_close(maskattn.masked_softmax(x, m).double(), ref(x, m), **TOL[torch.float32])


@pytest.mark.parametrize(
    "mdtype",
    [
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int32,
        torch.int64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
    ],
)
def test_mask_dtypes(mdtype):
    x = torch.randn(2, 3, 9)
    m = key_mask(2, 9, seed=1)[:, 0]  # [2, 1, 9]
    expected = maskattn.masked_softmax(x, m)
    torch.testing.assert_close(maskattn.masked_softmax(x, m.to(mdtype) * 3 if mdtype != torch.bool else m), expected)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_dims_and_strides(dim):
    x = torch.randn(4, 6, 8, 10).permute(0, 2, 1, 3)  # [4, 8, 6, 10], non-contiguous
    m = torch.rand(4, 1, 6, 1) < 0.6
    y = maskattn.masked_softmax(x, m, dim=dim, scale=2.0)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), ref(x, m, dim=dim, scale=2.0), **TOL[torch.float32])
    xs = torch.randn(4, 8, 6, 20)[..., ::2]  # strided softmax dim
    torch.testing.assert_close(
        maskattn.masked_softmax(xs, m, dim=dim).double(), ref(xs, m, dim=dim), **TOL[torch.float32]
    )
    xe = torch.randn(1, 8, 1, 10).expand(4, 8, 6, 10)  # zero strides in the scores
    torch.testing.assert_close(
        maskattn.masked_softmax(xe, m, dim=dim).double(), ref(xe, m, dim=dim), **TOL[torch.float32]
    )


def test_matches_the_hand_written_softmax_where_it_is_defined():
    # The Transformer key-padding mask: ids with 0 as padding, -1e9 fill; identical to ours on rows with a valid key.
    ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0]])
    scores = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(
        maskattn.masked_softmax(scores, (ids != 0)[:, None, None, :]), token_padding_softmax(scores, ids)
    )
    # JiT's masked_fill(-inf) on a padded batch without empty samples.
    x = torch.randn(2, 3, 16, 16)
    m = key_mask(2, 16, seed=3, full_rows=())
    torch.testing.assert_close(maskattn.masked_softmax(x, m, scale=0.125), jit_masked_softmax(x, m, 0.125))


def test_neg_inf_scores_and_extremes():
    x = torch.tensor([[[-float("inf"), -float("inf"), 0.0], [1e30, -1e30, 5.0], [-100.0, 0.0, -200.0]]])
    m = torch.tensor([True, True, False])
    y = maskattn.masked_softmax(x, m)
    torch.testing.assert_close(y[0, 0], torch.zeros(3))  # only -inf among the valid: zeros
    torch.testing.assert_close(y[0, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(y[0, 2], torch.tensor([0.0, 1.0, 0.0]))
    # Long range of exponents: float32 kernel vs float64 reference.
    xs = torch.linspace(-90, 0, 300).reshape(1, 300)
    torch.testing.assert_close(
        maskattn.masked_softmax(xs, torch.ones(300)).double(), ref(xs, torch.ones(300)), atol=1e-7, rtol=1e-5
    )


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 7, dtype=torch.float64, requires_grad=True)
    m = key_mask(2, 7, seed=4)
    assert torch.autograd.gradcheck(lambda t: maskattn.masked_softmax(t, m, -1, 0.7), (x,))
    xt = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    mt = torch.rand(3, 5, 1) < 0.6
    assert torch.autograd.gradcheck(lambda t: maskattn.masked_softmax(t, mt, 1, 1.5), (xt,))


def test_gradient_matches_the_hand_written_softmax_and_zero_on_masked():
    x = torch.randn(3, 2, 4, 9, dtype=torch.float64, requires_grad=True)
    m = key_mask(3, 9, seed=6)
    g = torch.randn(3, 2, 4, 9, dtype=torch.float64)
    (gx,) = torch.autograd.grad(maskattn.masked_softmax(x, m, scale=0.5), x, g)
    xr = x.detach()[1:].requires_grad_()
    (gr,) = torch.autograd.grad(jit_masked_softmax(xr, m[1:], 0.5), xr, g[1:])
    torch.testing.assert_close(gx[1:], gr)
    assert (gx[0] == 0).all()  # fully masked sample: zero gradient
    assert (gx.masked_select(~m.expand_as(gx)) == 0).all()
    # NaN / inf incoming gradients at masked positions do not leak.
    g2 = g.clone()
    g2.masked_fill_(~m.expand_as(g2), float("nan"))
    (gx2,) = torch.autograd.grad(maskattn.masked_softmax(x, m, scale=0.5), x, g2)
    torch.testing.assert_close(gx2, gx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_backward(dtype):
    x = torch.randn(2, 3, 40, dtype=dtype, requires_grad=True)
    m = torch.rand(2, 1, 40) < 0.5
    g = torch.randn(2, 3, 40, dtype=dtype)
    (gx,) = torch.autograd.grad(maskattn.masked_softmax(x, m, scale=0.3), x, g)
    xd = x.detach().double().requires_grad_()
    (gd,) = torch.autograd.grad(maskattn.masked_softmax(xd, m, scale=0.3), xd, g.double())
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double(), gd, **TOL[dtype])


def test_compile_fullgraph():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    m = key_mask(2, 16, seed=8)

    def f(t, mk):
        return (maskattn.masked_softmax(t.transpose(-1, -2), mk, -1, 0.25) * 2).sum((-1, -2))

    cf = torch.compile(f, fullgraph=True)
    out = cf(x, m)
    torch.testing.assert_close(out, f(x, m))
    (g1,) = torch.autograd.grad(out.sum(), x)
    (g2,) = torch.autograd.grad(f(x, m).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_empty_inputs():
    assert maskattn.masked_softmax(torch.randn(0, 4), torch.ones(4)).shape == (0, 4)
    assert maskattn.masked_softmax(torch.randn(3, 0), torch.ones(0)).shape == (3, 0)


def test_errors_name_argument():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"mask of shape \[2, 3\] does not broadcast to scores of shape \[2, 3, 4\]"):
        maskattn.masked_softmax(x, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="mask of shape"):
        maskattn.masked_softmax(x, torch.ones(1, 2, 3, 4))
    with pytest.raises(RuntimeError, match="scores must be float32"):
        maskattn.masked_softmax(torch.ones(2, 4, dtype=torch.int64), torch.ones(4))
    with pytest.raises(RuntimeError, match="dim = 3 is out of range"):
        maskattn.masked_softmax(x, torch.ones(4), dim=3)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        maskattn.masked_softmax(x, torch.ones(4), scale=float("inf"))
    with pytest.raises(RuntimeError, match="mask must be a bool, integer or floating"):
        maskattn.masked_softmax(x, torch.ones(4, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.maskattn._masked_softmax_backward(torch.ones(2, 3), torch.ones(2, 4), -1, 1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("N", [1, 31, 33, 128, 1000, 1024, 1025, 3000, 20000])
def test_cuda_matches_reference(dtype, N):
    x = (torch.randn(2, 3, 4, N, dtype=dtype) * 3).cuda()
    m = key_mask(2, N, seed=N).cuda()
    y = maskattn.masked_softmax(x, m, scale=0.5)
    torch.testing.assert_close(y.double().cpu(), ref(x.cpu(), m.cpu(), scale=0.5), **TOL[dtype])
    g = torch.randn_like(x)
    xr = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(maskattn.masked_softmax(xr, m, scale=0.5), xr, g)
    xc = x.detach().cpu().double().requires_grad_()
    (gc,) = torch.autograd.grad(maskattn.masked_softmax(xc, m.cpu(), scale=0.5), xc, g.cpu().double())
    torch.testing.assert_close(gx.double().cpu(), gc, **TOL[dtype])
    # Unaligned rows (odd offsets) and strided layouts take the scalar paths.
    rows = x.numel() // N
    xo = x.flatten()[1:][: (rows - 1) * N].view(rows - 1, N)
    mo = m.reshape(-1, N)[:1]
    torch.testing.assert_close(maskattn.masked_softmax(xo, mo).double().cpu(), ref(xo.cpu(), mo.cpu()), **TOL[dtype])
    yt = maskattn.masked_softmax(x.transpose(-1, -2), m.transpose(-1, -2), dim=-2)
    assert yt.is_contiguous()
    torch.testing.assert_close(yt.double().cpu(), ref(x.cpu(), m.cpu(), scale=1.0).transpose(-1, -2), **TOL[dtype])
