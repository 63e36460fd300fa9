"""Property tests: scaled_cross_attention against a float64 reference over generated shapes (B=0,
Lq=0, Lk=0 and 1, D=0, Dv=0 included; Lk up to 80, past both devices' one-pass limits), 2-D/3-D
query, shared or per-sample keys and values, key masks of every kind and dtype, normalize on/off, scales below and above the clamp (where the scale's gradient
is zero), strides and storage offsets, dtypes and devices; forward and every gradient."""

import math

import torch
import torch.nn.functional as F
from _props import (
    TOL,
    as_mask_dtype,
    close,
    examples,
    grad_or_zero,
    leaf,
    random_mask,
    st_device,
    st_dtype,
    st_layout,
    st_mask_dtype,
    st_seed,
)
from hypothesis import given
from hypothesis import strategies as st

import maskattn


def reference_cross_attention(q, k, v, lsl, max_scale, key_mask, normalize):
    """The contract in float64: clamped scale, cosine or dot logits, softmax over the valid keys (a
    query with no valid key: zero weights, zero output)."""
    q2d = q.dim() == 2
    q3 = q.unsqueeze(1) if q2d else q
    if normalize:
        q3, k = F.normalize(q3, dim=-1), F.normalize(k, dim=-1)
    scale = torch.exp(lsl).clamp(max=max_scale)
    logits = scale * torch.matmul(q3, k.transpose(-1, -2))  # [B, Lq, Lk]
    B, Lq, Lk = logits.shape
    valid = torch.ones(Lk, dtype=torch.bool) if key_mask is None else key_mask != 0
    valid = torch.broadcast_to(valid[:, None, :] if valid.dim() == 2 else valid, logits.shape)
    anyv = valid.any(-1, keepdim=True)
    z = torch.where(anyv, torch.where(valid, logits, float("-inf")), 0.0)
    attn = torch.where(valid, torch.softmax(z, -1), 0.0)
    out = torch.matmul(attn, v)
    return (out.squeeze(1), attn.squeeze(1)) if q2d else (out, attn)


@st.composite
def xattn_case(draw):
    B, Lq, Lk = draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.sampled_from([0, 1, 1, 2, 5, 17, 40, 80]))
    D, Dv = draw(st.integers(0, 24)), draw(st.integers(0, 9))
    q2d, k2d, v2d = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    mkind = draw(st.sampled_from(["none", "all", "empty", "random"]))
    m1d = draw(st.booleans())
    # log-scales below the cap, near it, and above it (the clamp is active: zero scale gradient)
    lsl = draw(st.sampled_from([0.0, -1.0, math.log(25.0), math.log(99.0), math.log(101.0), 6.0]))
    max_scale = draw(st.sampled_from([100.0, 10.0, math.inf]))
    return (
        B,
        Lq,
        Lk,
        D,
        Dv,
        q2d,
        k2d,
        v2d,
        mkind,
        m1d,
        draw(st_mask_dtype),
        lsl,
        max_scale,
        draw(st.booleans()),
        draw(st_dtype),
        draw(st_layout),
        draw(st_layout),
        draw(st_device),
        draw(st_seed),
    )


@examples(60)
@given(xattn_case())
def test_scaled_cross_attention_matches_reference(case):
    (
        B,
        Lq,
        Lk,
        D,
        Dv,
        q2d,
        k2d,
        v2d,
        mkind,
        m1d,
        mdtype,
        lsl,
        max_scale,
        normalize,
        dtype,
        qlay,
        klay,
        device,
        seed,
    ) = case
    if abs(math.exp(lsl) - max_scale) < 1e-6:
        return  # exactly at the cap the clamp's gradient is a convention; tested elsewhere
    g = torch.Generator().manual_seed(seed)
    # unit-ish rows keep the logits O(scale): tolerances below are relative to the scale
    qs = (B, D) if q2d else (B, Lq, D)
    ks = (Lk, D) if k2d else (B, Lk, D)
    vs = (Lk, Dv) if v2d else (B, Lk, Dv)
    sd = max(D, 1) ** -0.5
    q0 = (torch.randn(qs, generator=g, dtype=torch.float64) * sd).to(dtype)
    k0 = (torch.randn(ks, generator=g, dtype=torch.float64) * sd).to(dtype)
    v0 = torch.randn(vs, generator=g, dtype=torch.float64).to(dtype)
    if not normalize:  # dot logits: keep scale * <q, k> moderate
        q0 = (q0.double() / math.sqrt(min(math.exp(lsl), max_scale))).to(dtype)
    mask = None
    if mkind != "none":
        mask = as_mask_dtype(random_mask((Lk,) if m1d else (B, Lk), mkind, g), mdtype)
    q, k, v = leaf(q0.to(device), qlay), leaf(k0.to(device), klay), leaf(v0.to(device), "offset")
    # the scale is computed in logit_scale_log's dtype: float64 inputs get a float64 scale, or the
    # float32 rounding of exp(lsl) alone would exceed the float64 tolerance
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(lsl, dtype=sdt, device=device, requires_grad=True)
    out, attn = maskattn.scaled_cross_attention(
        q, k, v, s, max_scale, None if mask is None else mask.to(device), normalize
    )
    qr, kr, vr = (t.double().requires_grad_() for t in (q0, k0, v0))
    sr = torch.tensor(lsl, dtype=torch.float64, requires_grad=True)
    outr, attnr = reference_cross_attention(qr, kr, vr, sr, max_scale, mask, normalize)
    assert out.shape == outr.shape and attn.shape == attnr.shape and out.dtype == dtype
    tol = TOL[dtype]
    scale = min(math.exp(lsl), max_scale)
    ftol = 2 * tol
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16) and Lk > 64:
        # CUDA's GEMM path keeps the raw dots in the input dtype (docs/numerics.md): every logit
        # carries scale * eps of rounding, as the hand-written `exp(p).clamp(max=100)` composition does in half precision
        ftol *= max(1.0, scale if normalize else math.sqrt(scale))
    close(out, outr, ftol, "out")
    close(attn, attnr, ftol, "attn")
    if out.numel() + attn.numel() == 0:
        return
    go = torch.randn(outr.shape, generator=g, dtype=torch.float64)
    ga = torch.randn(attnr.shape, generator=g, dtype=torch.float64)
    ((out.double().cpu() * go).sum() + (attn.double().cpu() * ga).sum()).backward()
    ((outr * go).sum() + (attnr * ga).sum()).backward()
    gtol = 8 * tol * max(1.0, scale if normalize else 1.0)
    close(q.grad, grad_or_zero(qr), gtol * 4, "grad query")
    close(k.grad, grad_or_zero(kr), gtol * 4, "grad key")
    close(v.grad, grad_or_zero(vr), gtol, "grad value")
    if math.exp(lsl) > max_scale:
        assert s.grad is None or s.grad.item() == 0.0  # the clamp is active: no gradient, as torch.clamp
    else:
        close(s.grad.reshape(()), grad_or_zero(sr), gtol * max(1, B * max(Lq, 1) * Lk) ** 0.5, "grad logit_scale_log")
