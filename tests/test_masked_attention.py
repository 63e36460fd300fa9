"""maskattn.masked_attention against the hand-written masked attention (masked_fill(-inf), softmax,
weighted sum, padded query rows zeroed) for every mask form, on every device."""

import pytest
import torch
from conftest import DEVICES

import maskattn
from maskattn import masked_attention


def reference(q, k, v, mask_full, scale=None, query_valid=None):
    """float64 hand-written attention with a full [B, H, Lq, Lk] valid mask: masked_fill(-inf) +
    softmax, rows without a valid key set to 0 (where the hand-written code gives NaN), and the
    rows of padded queries set to 0."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    w = s.masked_fill(~mask_full, float("-inf")).softmax(-1)
    w = torch.where(mask_full.any(-1, keepdim=True), w, torch.zeros_like(w))
    if query_valid is not None:
        w = torch.where(query_valid, w, torch.zeros_like(w))
    return w @ v, w


def lengths_mask(lengths, N, device="cpu"):
    return torch.arange(N, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def qkv(B=3, H=2, N=7, D=8, Dv=None, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, N, Dv or D, generator=g, dtype=torch.float64)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["key_2d", "key_4d", "key_float", "pair_4d", "pair_2d"])
@pytest.mark.parametrize("zero_padded_queries", [True, False])
def test_every_mask_form_matches_reference(device, form, zero_padded_queries):
    B, H, N = 3, 2, 7
    q, k, v = qkv(B, H, N, device=device)
    key = lengths_mask([5, 0, 7], N, device)  # sample 1 has no valid token
    if form == "key_2d":
        mask, full = key, key[:, None, None, :].expand(B, H, N, N)
    elif form == "key_4d":
        mask, full = key[:, None, None, :], key[:, None, None, :].expand(B, H, N, N)
    elif form == "key_float":
        mask, full = key.double() * 3.0, key[:, None, None, :].expand(B, H, N, N)  # nonzero = valid
    elif form == "pair_4d":
        g = torch.Generator().manual_seed(1)
        mask = (torch.rand(B, H, N, N, generator=g) > 0.4).to(device)
        mask[0, 1, 2] = False  # a query row with no valid key
        full = mask
    else:
        mask = torch.tril(torch.ones(N, N, dtype=torch.bool, device=device))  # causal [Lq, Lk]
        mask[3] = False
        full = mask.expand(B, H, N, N)
    key_form = form.startswith("key")
    qv = key[:, None, :, None] if key_form and zero_padded_queries else None
    out = masked_attention(q, k, v, mask, zero_padded_queries=zero_padded_queries)
    ref, _ = reference(q, k, v, full, query_valid=qv)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if qv is not None:
        assert (out.masked_select(~qv.expand_as(out)) == 0).all()  # padded query rows exactly 0
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    out_w, w = masked_attention(q, k, v, mask, zero_padded_queries=zero_padded_queries, need_weights=True)
    ref_out, ref_w = reference(q, k, v, full, query_valid=qv)
    torch.testing.assert_close(out_w, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-12)


def test_zero_padded_queries_off_attends_valid_keys():
    q, k, v = qkv()
    key = lengths_mask([4, 7, 2], 7)
    on = masked_attention(q, k, v, key)
    off = masked_attention(q, k, v, key, zero_padded_queries=False)
    torch.testing.assert_close(on[key[:, None, :, None].expand_as(on)], off[key[:, None, :, None].expand_as(off)])
    assert (on[0, :, 4:] == 0).all() and (off[0, :, 4:] != 0).all()


def test_scale_and_no_mask():
    q, k, v = qkv()
    full = torch.ones(3, 2, 7, 7, dtype=torch.bool)
    torch.testing.assert_close(masked_attention(q, k, v), reference(q, k, v, full)[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        masked_attention(q, k, v, None, 0.3), reference(q, k, v, full, scale=0.3)[0], atol=1e-12, rtol=1e-12
    )
    key = lengths_mask([3, 6, 1], 7)
    torch.testing.assert_close(
        masked_attention(q, k, v, key, 0.3),
        reference(q, k, v, key[:, None, None, :].expand(3, 2, 7, 7), 0.3, key[:, None, :, None])[0],
        atol=1e-12,
        rtol=1e-12,
    )


def test_padding_content_reaches_nothing():
    q, k, v = qkv()
    key = lengths_mask([4, 0, 6], 7)
    clean = masked_attention(q, k, v, key)
    g = torch.randn_like(clean)
    grads = torch.autograd.grad(clean, (q, k, v), g)
    pad = ~key[:, None, :, None]
    dirty = [torch.where(pad, torch.full_like(t, float("nan")), t).detach().requires_grad_() for t in (q, k, v)]
    dirty[1].data[0, 0, 6] = float("inf")
    out = masked_attention(*dirty, key)
    assert torch.equal(out, clean)
    for a, b in zip(torch.autograd.grad(out, dirty, g), grads):
        assert torch.equal(a, b)
        assert (a.masked_select(pad.expand_as(a)) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 SDPA on CPU is slow and not what CPU users run")
    q, k, v = qkv(2, 4, 33, 64, device=device)
    key = lengths_mask([20, 33], 33, device)
    ref, _ = reference(q, k, v, key[:, None, None, :].expand(2, 4, 33, 33), query_valid=key[:, None, :, None])
    ql, kl, vl = (t.detach().to(dtype) for t in (q, k, v))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for pack in (None, False, True):
        out = masked_attention(ql, kl, vl, key, pack=pack)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out[0, :, 20:] == 0).all()
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    out = masked_attention(ql, kl, vl, key, fp32_attention=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_route_matches_sdpa_route(device):
    q, k, v = qkv(4, 2, 9, 8, device=device)
    key = lengths_mask([9, 0, 3, 6], 9, device)
    a = masked_attention(q, k, v, key, pack=False)
    b = masked_attention(q, k, v, key, pack=True)
    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_fp32_attention_under_autocast():
    q, k, v = qkv(2, 2, 16, 16, dtype=torch.float32)
    key = lengths_mask([16, 9], 16)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q_, *a, **kw):
        seen.append((q_.dtype, torch.is_autocast_enabled("cpu")))
        return real(q_, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
            out = masked_attention(qb, kb, vb, key, fp32_attention=True)
            out_half = masked_attention(qb, kb, vb, key)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert seen[0] == (torch.float32, False)  # logits in float32, autocast off
    assert seen[1][0] == torch.bfloat16 or seen[1][1]
    assert out.dtype == torch.bfloat16
    ref = masked_attention(*(t.detach().bfloat16().float() for t in (q, k, v)), key)
    assert (out.float() - ref).abs().max() <= (out_half.float() - ref).abs().max() + 1e-2


def test_compile_fullgraph():
    q, k, v = qkv(2, 2, 8, 8, dtype=torch.float32)
    key = lengths_mask([3, 8], 8)
    cf = torch.compile(lambda a, b, c, m: masked_attention(a, b, c, m), fullgraph=True)
    out = cf(q, k, v, key)
    torch.testing.assert_close(out, masked_attention(q, k, v, key))
    (g1,) = torch.autograd.grad(out.sum(), q)
    (g2,) = torch.autograd.grad(masked_attention(q, k, v, key).sum(), q)
    torch.testing.assert_close(g1, g2)


def test_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask of shape \(3, 6\) does not broadcast"):
        masked_attention(q, k, v, torch.ones(3, 6))
    with pytest.raises(ValueError, match="does not broadcast to the scores"):
        masked_attention(q, k, v, torch.ones(3, 2, 5, 7))
    with pytest.raises(TypeError, match="mask must be a real or bool tensor"):
        masked_attention(q, k, v, torch.ones(3, 7, dtype=torch.complex64))
    with pytest.raises(TypeError, match="mask must be a Tensor"):
        masked_attention(q, k, v, [[1, 0]])
    with pytest.raises(ValueError, match="must share their batch dims"):
        masked_attention(q, k[:, :, :, :4], v)
    with pytest.raises(ValueError, match=r"q must be \[..., L, D\]"):
        masked_attention(torch.ones(3), k, v)
    assert maskattn.masked_attention is masked_attention
