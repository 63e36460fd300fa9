"""The fused op torch.ops.maskattn.gated_masked_mean (+ its backward)."""

import pytest
import torch
from conftest import requires_cuda
from reference_gated_masked_mean import reference_gated_masked_mean

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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("logit_shape", ["b1hw", "bhw"])
def test_op_matches_reference(masked, logit_shape):
    f, l, m = _inputs()
    if logit_shape == "bhw":
        l = l[:, 0]
    m = m if masked else None
    p, g = op(f, l, m)
    rp, rg = reference_gated_masked_mean(f, l, m)
    assert g.shape == l.shape
    torch.testing.assert_close(p, rp)
    torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    f, l, m = _inputs(B=2, C=3, H=3, W=4)
    f.requires_grad_(True)
    l.requires_grad_(True)
    m = m if masked else None
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, m), (f, l))


def test_gradients_match_reference():
    f, l, m = _inputs(B=4, C=7, H=5, W=5)
    for mask in (None, m):
        f1, l1 = f.clone().requires_grad_(True), l.clone().requires_grad_(True)
        f2, l2 = f.clone().requires_grad_(True), l.clone().requires_grad_(True)
        p1, g1 = op(f1, l1, mask)
        p2, g2 = reference_gated_masked_mean(f2, l2, mask)
        gp, gg = torch.randn_like(p1), torch.randn_like(g1)
        a = torch.autograd.grad((p1 * gp).sum() + (g1 * gg).sum(), [f1, l1])
        b = torch.autograd.grad((p2 * gp).sum() + (g2 * gg).sum(), [f2, l2])
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
        # only one input needing grad
        only_f = torch.autograd.grad(op(f1, l.clone(), mask)[0].sum(), f1)[0]
        torch.testing.assert_close(
            only_f, torch.autograd.grad(reference_gated_masked_mean(f2, l, mask)[0].sum(), f2)[0]
        )


def test_fully_masked_sample_gives_zeros_and_zero_grad_no_nan():
    f, l, m = _inputs(B=3)
    m[1] = False
    f = f.clone()
    f[1] = float("nan")  # padding content must never leak
    f[0][:, ~m[0]] = float("inf")
    f.requires_grad_(True)
    l.requires_grad_(True)
    p, g = op(f, l, m)
    assert torch.all(p[1] == 0) and torch.all(g[1] == 0)
    assert torch.isfinite(p).all() and torch.isfinite(g).all()
    gf, gl = torch.autograd.grad(p.sum() + g.sum(), [f, l])
    assert torch.all(gf[1] == 0) and torch.all(gl[1] == 0)
    assert torch.isfinite(gl).all() and torch.isfinite(gf).all()
    assert torch.all(gl[:, 0][~m] == 0)


def test_padding_invariance():
    # Growing H/W with invalid cells does not change pooled or the valid gates.
    f, l, m = _inputs(B=2, C=4, H=4, W=5)
    F = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    L = torch.randn(2, 1, 6, 8, dtype=torch.float64)
    M = torch.zeros(2, 6, 8, dtype=torch.bool)
    F[:, :, :4, :5], L[:, :, :4, :5], M[:, :4, :5] = f, l, m
    p, g = op(f, l, m)
    P, G = op(F, L, M)
    torch.testing.assert_close(P, p)
    torch.testing.assert_close(G[:, :, :4, :5], g)
    assert torch.all(G[:, :, 4:] == 0) and torch.all(G[:, :, :, 5:] == 0)


@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16]
)
def test_every_mask_dtype(mask_dtype):
    f, l, m = _inputs()
    p, g = op(f, l, m.to(mask_dtype))
    rp, rg = op(f, l, m)
    assert torch.equal(p, rp) and torch.equal(g, rg)


def test_strided_and_permuted_inputs():
    f, l, m = _inputs(B=3, C=20, H=6, W=7)
    rp, rg = op(f, l, m)
    cl = f.to(memory_format=torch.channels_last)
    odd = f.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # H and W do not merge
    sliced = torch.randn(3, 40, 6, 9, dtype=torch.float64)[:, ::2, :, 1:8]
    sliced.copy_(f)
    lt = l[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    mt = m.transpose(1, 2).contiguous().transpose(1, 2)
    for ff in (cl, odd, sliced):
        for ll, mm in ((l, m), (lt, mt)):
            p, g = op(ff, ll, mm)
            torch.testing.assert_close(p, rp)
            torch.testing.assert_close(g.reshape(rg.shape), rg)
    # gradients for channels-last features (the backward's own layout path)
    for ff in (cl, odd):
        a = ff.detach().requires_grad_(True)
        b = f.detach().clone().requires_grad_(True)
        la = l.detach().clone().requires_grad_(True)
        lb = l.detach().clone().requires_grad_(True)
        ga = torch.autograd.grad(op(a, la, m)[0].square().sum(), [a, la])
        gb = torch.autograd.grad(op(b, lb, m)[0].square().sum(), [b, lb])
        assert ga[0].is_contiguous()
        torch.testing.assert_close(ga[0], gb[0])
        torch.testing.assert_close(ga[1], gb[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    f, l, m = _inputs(B=4, C=32, H=7, W=7)
    p, g = op(f.to(dtype), l.to(dtype), m)
    assert p.dtype == dtype and g.dtype == dtype
    rp, rg = reference_gated_masked_mean(f.to(dtype).double(), l.to(dtype).double(), m)
    torch.testing.assert_close(p.double(), rp, **TOL[dtype])
    torch.testing.assert_close(g.double(), rg, **TOL[dtype])
    fd, ld = f.to(dtype).requires_grad_(True), l.to(dtype).requires_grad_(True)
    gf, gl = torch.autograd.grad(op(fd, ld, m)[0].sum(), [fd, ld])
    f64, l64 = f.to(dtype).double().requires_grad_(True), l.to(dtype).double().requires_grad_(True)
    rf, rl = torch.autograd.grad(reference_gated_masked_mean(f64, l64, m)[0].sum(), [f64, l64])
    torch.testing.assert_close(gf.double(), rf, **TOL[dtype])
    torch.testing.assert_close(gl.double(), rl, **TOL[dtype])


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 0, 3, 3), (2, 3, 0, 4), (1, 1, 1, 1)])
def test_degenerate_shapes(shape):
    f = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    l = torch.randn(shape[0], 1, *shape[2:], dtype=torch.float64, requires_grad=True)
    p, g = op(f, l)
    rp, rg = reference_gated_masked_mean(f, l)
    assert p.shape == (shape[0], shape[1]) and g.shape == l.shape
    torch.testing.assert_close(p, torch.nan_to_num(rp, nan=0.0))
    gf, gl = torch.autograd.grad(p.sum(), [f, l], allow_unused=True)
    assert gf.shape == f.shape and gl.shape == l.shape


def test_errors():
    f, l, m = _inputs()
    with pytest.raises(RuntimeError, match="features must be"):
        op(f[0], l, m)
    with pytest.raises(RuntimeError, match="gate_logits must be"):
        op(f, l[:, :, :2], m)
    with pytest.raises(RuntimeError, match="gate_logits .* same dtype"):
        op(f, l.float(), m)
    with pytest.raises(RuntimeError, match="mask must be"):
        op(f, l, m[:, :2])
    with pytest.raises(RuntimeError, match="features must be float32"):
        op(f.to(torch.int64), l.to(torch.int64), m)
    with pytest.raises(RuntimeError, match="grad_pooled must be"):
        bwd(torch.zeros(2, 2, dtype=torch.float64), None, f, torch.sigmoid(l), m, [True, True])


def test_op_compile_fullgraph():
    f, l, m = _inputs(B=2, C=8, H=7, W=7, dtype=torch.float32)
    fn = torch.compile(lambda a, b, c: op(a, b, c), fullgraph=True)
    p, g = fn(f.to(memory_format=torch.channels_last), l, m)
    rp, rg = op(f, l, m)
    torch.testing.assert_close(p, rp)
    torch.testing.assert_close(g, rg)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    f, l, m = _inputs(B=4, C=70, H=7, W=9)
    m[2] = False
    for ff in (f, f.to(memory_format=torch.channels_last)):
        for mask in (None, m):
            a, b = ff.to(dtype).cuda().requires_grad_(True), l.to(dtype).cuda().requires_grad_(True)
            p, g = op(a, b, None if mask is None else mask.cuda())
            gp = torch.randn_like(p)
            ga = torch.autograd.grad((p * gp).sum() + g.sum(), [a, b])
            c, d = ff.to(dtype).requires_grad_(True), l.to(dtype).requires_grad_(True)
            pc, gc = op(c, d, mask)
            gc_ = torch.autograd.grad((pc * gp.cpu()).sum() + gc.sum(), [c, d])
            tol = TOL[dtype]
            torch.testing.assert_close(p.cpu(), pc, **tol)
            torch.testing.assert_close(g.cpu(), gc, **tol)
            torch.testing.assert_close(ga[0].cpu(), gc_[0], **tol)
            torch.testing.assert_close(ga[1].cpu(), gc_[1], **tol)
    fc, lc, mc = f.cuda().requires_grad_(True), l.cuda().requires_grad_(True), m.cuda()
    torch.library.opcheck(op, (fc, lc, mc))
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, mc), (fc, lc))
