"""MaskedSelfAttention loads and computes JiT's and timm's attention (qk-norm, rope, float32 logits)
under their own parameter names: strict state-dict loads both ways, identical outputs and gradients
with and without rope and mask, on every device."""

import functools

import pytest
import torch
from conftest import DEVICES
from reference_masked_self_attention import Attention, TimmAttention, VisionRotaryEmbeddingFast
from torch import nn

from maskattn.nn import MaskedSelfAttention

DIM, HEADS, GRID = 64, 4, 4  # head_dim 16, a 4 x 4 patch grid


def lengths_mask(lengths, N, device="cpu"):
    return torch.arange(N, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def jit_pair(dtype=torch.float64, device="cpu", seed=0, **kw):
    torch.manual_seed(seed)
    ref = Attention(DIM, HEADS, qkv_bias=True, qk_norm=True)
    with torch.no_grad():  # trained-looking norm weights, so that a skipped norm would show
        ref.q_norm.weight.uniform_(0.5, 1.5)
        ref.k_norm.weight.uniform_(0.5, 1.5)
    mod = MaskedSelfAttention(DIM, HEADS, qkv_bias=True, qk_norm=True, norm_layer="rmsnorm", **kw)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device, dtype), mod.to(device, dtype)


def grads_by_name(y, x, module, g):
    """{"x": dL/dx, parameter name: dL/dp} (JiT registers q_norm before qkv, timm after)."""
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    return dict(zip(("x", *names), grads))


def assert_grads_equal(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")  # noqa: B023


def rope_for(N, device, dtype, n_cls=0):
    rope = VisionRotaryEmbeddingFast(DIM // HEADS // 2, pt_seq_len=GRID, num_cls_token=n_cls)
    assert rope.freqs_cos.shape == (N, DIM // HEADS)
    return rope.to(device, dtype)


def test_state_dicts_load_both_ways_strict():
    ref, mod = jit_pair()
    assert (
        set(ref.state_dict())
        == set(mod.state_dict())
        == {
            "qkv.weight",
            "qkv.bias",
            "q_norm.weight",
            "k_norm.weight",
            "proj.weight",
            "proj.bias",
        }
    )
    back = Attention(DIM, HEADS).double()
    back.load_state_dict(mod.state_dict(), strict=True)
    for name, t in back.state_dict().items():
        assert torch.equal(t, ref.state_dict()[name])
    timm = TimmAttention(DIM, HEADS, qkv_bias=False, qk_norm=True, proj_bias=False, norm_layer=nn.LayerNorm)
    ours = MaskedSelfAttention(DIM, HEADS, qkv_bias=False, qk_norm=True, norm_layer=nn.LayerNorm, proj_bias=False)
    ours.load_state_dict(timm.state_dict(), strict=True)
    assert set(timm.state_dict()) == set(ours.state_dict())
    assert "q_norm.bias" in ours.state_dict() and "proj.bias" not in ours.state_dict()
    TimmAttention(DIM, HEADS, qkv_bias=False, qk_norm=True, proj_bias=False).load_state_dict(ours.state_dict())
    # a JiT checkpoint does not load into the attention without qk-norm: the keys say why
    with pytest.raises(RuntimeError, match="q_norm.weight"):
        MaskedSelfAttention(DIM, HEADS).load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_form", [None, "module", "cos_sin"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_jit_attention_float64(device, rope_form, masked):
    ref, mod = jit_pair(device=device)
    B, N = 3, GRID * GRID
    rope = rope_for(N, device, torch.float64) if rope_form else None
    ours_rope = (rope.freqs_cos, rope.freqs_sin) if rope_form == "cos_sin" else rope
    mask = lengths_mask([16, 9, 3], N, device) if masked else None
    x = torch.randn(B, N, DIM, dtype=torch.float64, device=device, requires_grad=True)
    y_ref = ref(x, rope=rope, attention_mask=None if mask is None else mask.double())
    y = mod(x, mask=mask, rope=ours_rope)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    assert_grads_equal(grads_by_name(y, x, mod, g), grads_by_name(y_ref, x, ref, g), atol=1e-12, rtol=1e-12)
    if rope_form is not None:  # the rope takes part: without it the output moves
        assert (mod(x, mask=mask) - y).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_matches_jit_attention_float32(device):
    ref, mod = jit_pair(dtype=torch.float32, device=device)
    N = GRID * GRID
    rope = rope_for(N, device, torch.float32)
    mask = lengths_mask([16, 5], N, device)
    x = torch.randn(2, N, DIM, device=device)
    torch.testing.assert_close(mod(x, mask=mask, rope=rope), ref(x, rope=rope, attention_mask=mask.float()))
    torch.testing.assert_close(mod(x, rope=rope), ref(x, rope=rope))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_padded_sample_is_zero_where_jit_gives_nan(device):
    ref, mod = jit_pair(device=device)
    N = GRID * GRID
    rope = rope_for(N, device, torch.float64)
    mask = lengths_mask([7, 0], N, device)
    x = torch.randn(2, N, DIM, dtype=torch.float64, device=device, requires_grad=True)
    y = mod(x, mask=mask, rope=rope)
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[0, 7:] == 0).all()
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and (gx[1] == 0).all()
    assert torch.isnan(ref(x, rope=rope, attention_mask=mask.double())[1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["layernorm_class", "layernorm_partial"])
def test_matches_timm_attention(device, norm):
    layer = nn.LayerNorm if norm == "layernorm_class" else functools.partial(nn.LayerNorm, eps=1e-6)
    torch.manual_seed(1)
    timm = TimmAttention(DIM, HEADS, qkv_bias=True, qk_norm=True, norm_layer=layer)
    with torch.no_grad():
        for p in (timm.q_norm.weight, timm.k_norm.weight, timm.q_norm.bias, timm.k_norm.bias):
            p.uniform_(-0.5, 1.5)
    ours = MaskedSelfAttention(DIM, HEADS, qkv_bias=True, qk_norm=True, norm_layer=layer)
    ours.load_state_dict(timm.state_dict(), strict=True)
    timm, ours = timm.to(device, torch.float64), ours.to(device, torch.float64)
    x = torch.randn(3, 10, DIM, dtype=torch.float64, device=device, requires_grad=True)
    torch.testing.assert_close(ours(x), timm(x), atol=1e-12, rtol=1e-12)
    mask = lengths_mask([10, 4, 7], 10, device)
    y_ref = timm(x, attn_mask=mask[:, None, None, :])  # timm leaves padded rows as they come
    y = ours(x, mask=mask)
    torch.testing.assert_close(y[mask], y_ref[mask], atol=1e-12, rtol=1e-12)
    assert (y[~mask] == 0).all()
    g = torch.randn_like(y) * mask[..., None]
    assert_grads_equal(grads_by_name(y, x, ours, g), grads_by_name(y_ref, x, timm, g), atol=1e-12, rtol=1e-12)
    # "layernorm" by name is timm ViT's LayerNorm(eps=1e-6)
    named = MaskedSelfAttention(DIM, HEADS, qk_norm=True, norm_layer="layernorm")
    assert isinstance(named.q_norm, nn.LayerNorm) and named.q_norm.eps == 1e-6


def test_fp32_attention_matches_jit_under_autocast():
    ref, mod = jit_pair(dtype=torch.float32, fp32_attention=True)
    N = GRID * GRID
    rope = rope_for(N, "cpu", torch.float32)
    mask = lengths_mask([16, 11], N)
    x = torch.randn(2, N, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x, mask=mask, rope=rope)
        y_ref = ref(x, rope=rope, attention_mask=mask.float())
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        exact = ref(x, rope=rope, attention_mask=mask.float())
    assert (y.float() - exact).abs().max() < 5e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_form", ["module", "cos_sin", "callable", "per_sample_cos_sin"])
def test_packed_module_route_applies_rope_at_original_positions(device, rope_form):
    _, mod = jit_pair(device=device)
    N = GRID * GRID
    rope = rope_for(N, device, torch.float64)
    B = 3
    if rope_form == "module":
        r = rope
    elif rope_form == "cos_sin":
        r = (rope.freqs_cos[None, None], rope.freqs_sin[None, None])
    elif rope_form == "callable":
        r = lambda t: rope(t)  # noqa: E731 - a callable without tables: the scatter / gather path
    else:
        shift = torch.arange(B, device=device, dtype=torch.float64)[:, None, None, None] * 0.1
        r = (rope.freqs_cos[None, None] + shift, rope.freqs_sin[None, None] - shift)
    mask = torch.rand(B, N, device=device) > 0.4  # padding anywhere, not only at the end
    mask[2] = False
    x = torch.randn(B, N, DIM, dtype=torch.float64, device=device, requires_grad=True)
    mod.pack_padding = False
    y = mod(x, mask=mask, rope=r)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *mod.parameters()], g)
    mod.pack_padding = True
    yp = mod(x, mask=mask, rope=r)
    torch.testing.assert_close(yp, y, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(yp, [x, *mod.parameters()], g), grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_padding_invariance_with_qk_norm_and_rope():
    _, mod = jit_pair()
    lengths = [5, 12, 2]
    xs = [torch.randn(n, DIM, dtype=torch.float64) for n in lengths]
    Nmax = 20
    rope = rope_for(GRID * GRID, "cpu", torch.float64)
    cos = torch.cat([rope.freqs_cos, torch.ones(Nmax - 16, DIM // HEADS, dtype=torch.float64)])
    sin = torch.cat([rope.freqs_sin, torch.zeros(Nmax - 16, DIM // HEADS, dtype=torch.float64)])
    outs = []
    for N, fill in [(12, 0.0), (16, float("nan")), (20, float("inf")), (13, 1e6)]:
        x = torch.full((3, N, DIM), fill, dtype=torch.float64)
        for b, t in enumerate(xs):
            x[b, : lengths[b]] = t
        m = lengths_mask(lengths, N)
        for pack in (False, True):
            mod.pack_padding = pack
            y = mod(x, mask=m, rope=(cos[:N], sin[:N]))
            assert torch.isfinite(y).all() and (y[~m] == 0).all()
            outs.append([y[b, :n] for b, n in enumerate(lengths)])
    mod.pack_padding = None
    for b, n in enumerate(lengths):
        alone = mod(xs[b][None], rope=(cos[:n], sin[:n]))[0]
        for o in outs:
            torch.testing.assert_close(o[b], alone, atol=1e-12, rtol=1e-12)


def test_compile_fullgraph_with_qk_norm_and_rope():
    _, mod = jit_pair(dtype=torch.float32)
    N = GRID * GRID
    rope = rope_for(N, "cpu", torch.float32)
    mask = lengths_mask([16, 6], N)
    x = torch.randn(2, N, DIM, requires_grad=True)
    for r in (rope, (rope.freqs_cos, rope.freqs_sin)):
        cf = torch.compile(lambda t, m: mod(t, mask=m, rope=r), fullgraph=True)  # noqa: B023
        y = cf(x, mask)
        y_eager = mod(x, mask=mask, rope=r)
        torch.testing.assert_close(y, y_eager)
        g = torch.randn_like(y)
        for a, b in zip(
            torch.autograd.grad(y, [x, *mod.parameters()], g), torch.autograd.grad(y_eager, [x, *mod.parameters()], g)
        ):
            torch.testing.assert_close(a, b)


def test_compile_fullgraph_under_autocast_with_float32_rope_table():
    # a float32 (cos, sin) on bfloat16 q and k promotes them; the attention then runs in autocast's dtype
    _, mod = jit_pair(dtype=torch.float32)
    N = GRID * GRID
    rope = rope_for(N, "cpu", torch.float32)
    mask = lengths_mask([16, 5], N)
    x = torch.randn(2, N, DIM)

    def f(t, m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mod(t, mask=m, rope=(rope.freqs_cos, rope.freqs_sin))

    y = torch.compile(f, fullgraph=True)(x, mask)
    y_eager = f(x, mask)
    assert y.dtype == y_eager.dtype == torch.bfloat16 and (y[1, 5:] == 0).all()
    torch.testing.assert_close(y.float(), y_eager.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), mod(x, mask=mask, rope=rope), atol=5e-2, rtol=5e-2)


def test_argument_errors():
    with pytest.raises(ValueError, match="norm_layer must be 'rmsnorm', 'layernorm'"):
        MaskedSelfAttention(DIM, HEADS, qk_norm=True, norm_layer="batchnorm")
    with pytest.raises(TypeError, match="norm_layer must be"):
        MaskedSelfAttention(DIM, HEADS, qk_norm=True, norm_layer=3)
    with pytest.raises(ValueError, match="norm_eps applies to"):
        MaskedSelfAttention(DIM, HEADS, qk_norm=True, norm_layer=nn.LayerNorm, norm_eps=1e-5)
    assert MaskedSelfAttention(DIM, HEADS, qk_norm=True, norm_eps=1e-5).q_norm.eps == 1e-5
    mod = MaskedSelfAttention(DIM, HEADS, qk_norm=True)
    x = torch.randn(2, 16, DIM)
    with pytest.raises(TypeError, match="rope must be a callable"):
        mod(x, rope=3.0)
    with pytest.raises(TypeError, match=r"pass a rotary embedding by keyword: attn\(x, rope=rope\)"):
        mod(x, rope_for(16, "cpu", torch.float32))  # JiT's positional attn(x, rope)
    with pytest.raises(TypeError, match=r"\(cos, sin\) pair"):
        mod(x, rope=(torch.ones(16, 16),) * 3)
    assert "qk_norm=True" in repr(mod)
