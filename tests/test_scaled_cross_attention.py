import math

import pytest
import torch
from reference_scaled_cross_attention import prototype_cross_attention

from maskattn import scaled_cross_attention

OP = torch.ops.maskattn.scaled_cross_attention.default
BWD = torch.ops.maskattn._scaled_cross_attention_backward.default
LOG_BELOW = math.log(25.0)  # scale 25: under the cap
LOG_ABOVE = math.log(150.0)  # scale 150: clamped to 100, zero gradient for the scale
FUSED_LK, GEMM_LK = 5, 70  # one-pass row kernels vs GEMMs around the fused softmax (both devices)

from conftest import DEVICES as devices  # noqa: E402


def make(
    B=3, Lq=4, Lk=5, D=12, Dv=7, dtype=torch.float64, device="cpu", shared=False, q2d=False, log_scale=LOG_BELOW, seed=0
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((B, D) if q2d else (B, Lq, D), generator=g, dtype=torch.float64)
    k = torch.randn((Lk, D) if shared else (B, Lk, D), generator=g, dtype=torch.float64)
    v = torch.randn((Lk, Dv) if shared else (B, Lk, Dv), generator=g, dtype=torch.float64)
    lsl = torch.tensor(log_scale, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [lsl.to(device)]


def grads_of(fn, tensors, go, ga):
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    out, attn = fn(*ts)
    loss = (out * go).sum() + (attn * ga).sum()
    loss.backward()
    return out.detach(), attn.detach(), [t.grad for t in ts]


def check_against_sap(q, k, v, lsl, mask=None, normalize=True, max_scale=100.0, atol=1e-9, rtol=1e-7, ref_dtype=None):
    go, ga = _cotangents(q, k, v)
    o1, a1, g1 = grads_of(
        lambda *t: scaled_cross_attention(*t, max_scale=max_scale, key_mask=mask, normalize=normalize),
        [q, k, v, lsl],
        go,
        ga,
    )
    rd = ref_dtype or q.dtype
    ref_in = [t.to(rd) for t in (q, k, v)] + [lsl.to(torch.float64 if ref_dtype else lsl.dtype)]
    o2, a2, g2 = grads_of(
        lambda *t: prototype_cross_attention(*t, max_scale, mask, normalize), ref_in, go.to(rd), ga.to(rd)
    )
    torch.testing.assert_close(a1.to(rd), a2, atol=atol, rtol=rtol)
    torch.testing.assert_close(o1.to(rd), o2, atol=atol, rtol=rtol)
    for name, x, y in zip(("query", "key", "value", "logit_scale_log"), g1, g2):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.to(y.dtype), y, atol=atol * 10, rtol=rtol * 10, msg=lambda m: f"grad {name}: {m}")
    return g1


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("q2d", [False, True])
@pytest.mark.parametrize("log_scale", [LOG_BELOW, LOG_ABOVE])
def test_matches_sap_forward_and_all_grads(device, Lk, normalize, shared, q2d, log_scale):
    q, k, v, lsl = make(Lk=Lk, shared=shared, q2d=q2d, log_scale=log_scale, device=device)
    if not normalize:  # raw dot products: keep the logits O(1) so the softmax is not one-hot
        q, k = q / 4, k / 4
    gs = check_against_sap(q, k, v, lsl, normalize=normalize)
    if log_scale == LOG_ABOVE:
        assert gs[3].item() == 0.0  # exactly torch.clamp's rule
    else:
        assert gs[3].abs().item() > 0


@pytest.mark.parametrize("device", devices)
def test_few_shot_call_pattern(device):
    # The few-shot model: ~100 samples, one query each, against 5 shared prototypes of 640 features.
    q, k, v, lsl = make(B=100, Lk=5, D=640, Dv=640, q2d=True, shared=True, device=device, dtype=torch.float32)
    lsl = lsl.float()
    check_against_sap(q, k, k, lsl, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
def test_float32_scale_gradient_is_accurate(device, Lk):
    # The softmax gradient sums to zero only in exact arithmetic; unless its float sum is sent to
    # the arg-max key (as the eager row-max subtraction does), sum dlogit * cos drifts by ~0.3%
    # at the few-shot shape in float32.
    q, k, v, lsl = make(B=100, Lk=Lk, D=640, Dv=640, q2d=True, shared=True, device=device)
    q = k[torch.arange(100) % Lk] + 1.5 * q  # samples near their prototype: peaked attention
    go = torch.randn(100, 640, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    grads = []
    for dt in (torch.float64, torch.float32):
        l = lsl.to(dt).clone().requires_grad_(True)
        out, _ = scaled_cross_attention(q.to(dt), k.to(dt), k.to(dt), l, normalize=True)
        (out * go.to(dt)).sum().backward()
        grads.append(l.grad.item())
    assert abs(grads[1] - grads[0]) <= 2e-5 * abs(grads[0]) + 1e-6, grads


def test_scale_dtype_may_differ_from_inputs():
    q, k, v, lsl = make()
    check_against_sap(q, k, v, lsl.float(), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("device", devices)
def test_cap_boundary_and_no_cap(device):
    q, k, v, _ = make(device=device)
    # max_scale = inf (open_clip mode): the gradient always flows, even at scale 150
    lsl = torch.tensor(LOG_ABOVE, dtype=torch.float64, device=device)
    gs = check_against_sap(q, k, v, lsl, max_scale=math.inf)
    assert gs[3].item() != 0
    # Exactly at the cap the gradient passes (DESIGN: zero only while exp(lsl) > max_scale), as
    # torch.clamp's backward did up to 2.13 (2.14 blocks it there). So the reference for this point
    # is the uncapped layer, whose scale and gradient there are the same on every torch release.
    lsl = torch.tensor(0.0, dtype=torch.float64, device=device)
    at_cap = grads_of(
        lambda *t: scaled_cross_attention(*t, max_scale=1.0, normalize=True),
        [q, k, v, lsl],
        *_cotangents(q, k, v),
    )[2]
    uncapped = check_against_sap(q, k, v, lsl, max_scale=math.inf)
    assert at_cap[3].item() != 0
    for x, y in zip(at_cap, uncapped):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def _cotangents(q, k, v):
    g = torch.Generator().manual_seed(1)
    go = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g, dtype=torch.float64).to(q.device, q.dtype)
    ga = torch.randn(q.shape[:-1] + k.shape[-2:-1], generator=g, dtype=torch.float64).to(q.device, q.dtype)
    return go, ga


MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("shared_mask", [True, False])
def test_key_mask_matches_sap(device, Lk, mask_dtype, shared_mask):
    q, k, v, lsl = make(Lk=Lk, device=device)
    g = torch.Generator().manual_seed(3)
    m = torch.rand((Lk,) if shared_mask else (3, Lk), generator=g) > 0.4
    m[..., 0] = True  # every query keeps a valid key (the reference NaNs otherwise)
    m = m.to(device=device, dtype=mask_dtype)
    check_against_sap(q, k, v, lsl, mask=m)
    _, attn = scaled_cross_attention(q, k, v, lsl, key_mask=m, normalize=True)
    mb = m.bool() if shared_mask else m.bool().unsqueeze(1)
    assert torch.all(attn.masked_select(~mb.expand_as(attn)) == 0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
def test_fully_masked_query_gives_zeros_and_zero_grads(device, Lk):
    q, k, v, lsl = make(Lk=Lk, device=device)
    m = torch.ones(3, Lk, dtype=torch.bool, device=device)
    m[1] = False
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, lsl)]
    out, attn = scaled_cross_attention(*ts, key_mask=m, normalize=True)
    assert torch.all(out[1] == 0) and torch.all(attn[1] == 0)
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    (out.square().sum() + attn.sum()).backward()
    for t in ts:
        assert torch.isfinite(t.grad).all()
    assert torch.all(ts[0].grad[1] == 0) and torch.all(ts[1].grad[1] == 0) and torch.all(ts[2].grad[1] == 0)
    # no key at all
    out, attn = scaled_cross_attention(q, k[:, :0], v[:, :0], lsl)
    assert out.shape == (3, 4, 7) and torch.all(out == 0) and attn.shape == (3, 4, 0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
def test_padding_invariance(device, Lk):
    q, k, v, lsl = make(Lk=Lk, device=device)
    pad = 3
    kp = torch.cat([k, 1e3 * torch.randn(3, pad, k.shape[-1], dtype=k.dtype, device=device)], 1)
    vp = torch.cat([v, 1e3 * torch.randn(3, pad, v.shape[-1], dtype=v.dtype, device=device)], 1)
    m = torch.ones(3, Lk + pad, dtype=torch.bool, device=device)
    m[:, Lk:] = False
    go = torch.randn(3, 4, v.shape[-1], dtype=q.dtype, device=device)
    o1, a1, g1 = grads_of(
        lambda *t: scaled_cross_attention(*t, normalize=True),
        [q, k, v, lsl],
        go,
        torch.zeros(3, 4, Lk, dtype=q.dtype, device=device),
    )
    o2, a2, g2 = grads_of(
        lambda *t: scaled_cross_attention(*t, key_mask=m, normalize=True),
        [q, kp, vp, lsl],
        go,
        torch.zeros(3, 4, Lk + pad, dtype=q.dtype, device=device),
    )
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(a1, a2[..., :Lk])
    assert torch.all(a2[..., Lk:] == 0)
    torch.testing.assert_close(g1[0], g2[0])
    torch.testing.assert_close(g1[1], g2[1][:, :Lk])
    torch.testing.assert_close(g1[2], g2[2][:, :Lk])
    torch.testing.assert_close(g1[3], g2[3])
    assert torch.all(g2[1][:, Lk:] == 0) and torch.all(g2[2][:, Lk:] == 0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
def test_strided_inputs(device, Lk):
    q, k, v, lsl = make(Lk=Lk, device=device)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B,Lq,D] with stride(-1) != 1
    ks = k.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    vs = v[:, :, :1].expand(v.shape).clone()[:, :, :].transpose(0, 0)
    vs = torch.cat([v, v], -1)[..., ::2]  # every other column
    assert not qs.is_contiguous() and not ks.is_contiguous() and not vs.is_contiguous()
    o1, a1 = scaled_cross_attention(q, k, vs.contiguous(), lsl, normalize=True)
    o2, a2 = scaled_cross_attention(qs, ks, vs, lsl, normalize=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(a1, a2)
    assert o2.is_contiguous() and a2.is_contiguous()
    check_against_sap(qs, ks, vs, lsl)
    # expanded (stride-0) query rows
    qe = q[:, :1].expand(q.shape)
    check_against_sap(qe, k, v, lsl)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("Lk", [3, GEMM_LK])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck(device, Lk, normalize, shared):
    q, k, v, lsl = make(B=2, Lq=3, Lk=Lk, D=5, Dv=4, shared=shared, device=device)
    if Lk == GEMM_LK:
        q, k, v = q[:1], (k if shared else k[:1]), (v if shared else v[:1])
    m = torch.ones(q.shape[0], Lk, device=device)
    m[0, 1] = 0
    if not normalize:
        q, k = q / 3, k / 3
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, lsl)]
    assert torch.autograd.gradcheck(lambda *t: scaled_cross_attention(*t, 100.0, m, normalize), ts)
    ts[3] = torch.tensor(LOG_ABOVE, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: scaled_cross_attention(*t, 100.0, None, normalize), ts)


def test_gradcheck_tiny_norm_rows():
    # a query and a key with norm below F.normalize's eps: the clamped-norm branch of the backward
    q, k, v, lsl = make(B=2, Lq=3, Lk=4, D=5, Dv=3)
    q[0, 1] = 1e-14
    k[1, 2] = 3e-13
    check_against_sap(q, k, v, lsl, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("device", devices)
def test_compile_fullgraph(device):
    q, k, v, lsl = make(dtype=torch.float32, device=device)
    lsl = lsl.float()
    m = torch.ones(3, 5, dtype=torch.bool, device=device)
    m[0, 0] = False

    def f(q, k, v, lsl):
        out, attn = scaled_cross_attention(q, k, v, lsl, 100.0, m, True)
        return out.sum() + (attn * attn).sum()

    cf = torch.compile(f, fullgraph=True, backend="inductor" if device == "cpu" else "inductor")
    ts1 = [t.clone().requires_grad_(True) for t in (q, k, v, lsl)]
    ts2 = [t.clone().requires_grad_(True) for t in (q.transpose(0, 0), k, v, lsl)]
    f(*ts1).backward()
    # a permuted query under compile: the fake kernel must give the real kernel's strides
    ts2[0] = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    cf(*ts2).backward()
    for a, b in zip(ts1, ts2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lk", [FUSED_LK, GEMM_LK])
def test_half_types(device, dtype, Lk):
    q, k, v, lsl = make(B=2, Lq=6, Lk=Lk, D=32, Dv=16, device=device)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    lsl = lsl.float()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    out, attn = scaled_cross_attention(q, k, v, lsl, normalize=True)
    assert out.dtype == dtype and attn.dtype == dtype
    # compared with the float64 composition of the same (rounded) inputs; the GEMM path rounds
    # the raw dot products to the input dtype, and a scale of 25 amplifies that.
    check_against_sap(q, k, v, lsl, atol=tol * (4 if Lk == GEMM_LK else 1), rtol=tol, ref_dtype=torch.float64)


def test_errors():
    q, k, v, lsl = make()
    with pytest.raises(RuntimeError, match="query must be"):
        scaled_cross_attention(q[0, 0], k, v, lsl)
    with pytest.raises(RuntimeError, match="key .* must have the same feature size D"):
        scaled_cross_attention(q, k[..., :3], v, lsl)
    with pytest.raises(RuntimeError, match="key .* must have batch size B"):
        scaled_cross_attention(q, k[:2], v, lsl)
    with pytest.raises(RuntimeError, match="value .* must have Lk = 5"):
        scaled_cross_attention(q, k, v[:, :4], lsl)
    with pytest.raises(RuntimeError, match="logit_scale_log must be a 0-dim"):
        scaled_cross_attention(q, k, v, lsl.reshape(1))
    with pytest.raises(RuntimeError, match="same dtype"):
        scaled_cross_attention(q, k.float(), v, lsl)
    with pytest.raises(RuntimeError, match="query must be float32"):
        scaled_cross_attention(q.long(), k.long(), v.long(), lsl)
    with pytest.raises(RuntimeError, match="key_mask must be"):
        scaled_cross_attention(q, k, v, lsl, key_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="max_scale must be positive"):
        scaled_cross_attention(q, k, v, lsl, max_scale=0.0)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        BWD(
            torch.zeros(3, 4, 6, dtype=q.dtype),
            None,
            q,
            k,
            v,
            lsl,
            torch.zeros(3, 4, 5, dtype=q.dtype),
            100.0,
            True,
            [True] * 4,
        )


def test_zero_size_batch():
    q, k, v, lsl = make(B=0)
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, lsl)]
    out, attn = scaled_cross_attention(*ts, normalize=True)
    assert out.shape == (0, 4, 7) and attn.shape == (0, 4, 5)
    (out.sum() + attn.sum()).backward()
    assert ts[3].grad.item() == 0
