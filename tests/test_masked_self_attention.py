import pytest
import torch
from conftest import requires_cuda
from reference_masked_softmax import MultiHeadAttention, jit_block_output
from reference_patch_mask import jit_condition_mask

import maskattn
from maskattn.nn import MaskedSelfAttention, prepend_condition_mask


def lengths_mask(lengths, N):
    return torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]


def pair(dim=32, heads=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ref = MultiHeadAttention(dim, heads).to(dtype)
    mod = MaskedSelfAttention(dim, heads).to(dtype)
    mod.load_state_dict(ref.state_dict())  # JiT's attention checkpoint loads as is (strict)
    return ref, mod


@pytest.mark.parametrize("need_weights", [False, True])
def test_parity_with_jit_attention_forward_and_grads(need_weights):
    ref, mod = pair()
    mask = lengths_mask([9, 4, 12], 12)
    x = torch.randn(3, 12, 32, dtype=torch.float64, requires_grad=True)
    out = mod(x, mask=mask, need_weights=need_weights)
    y = out[0] if need_weights else out
    y_ref = jit_block_output(ref, x, mask.double())
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *mod.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    if need_weights:
        w = out[1]
        assert w.shape == (3, 4, 12, 12)
        assert (w[1, :, :, 4:] == 0).all() and (w[1, :, 4:, :] == 0).all()
        torch.testing.assert_close(w[1, :, :4, :4].sum(-1), torch.ones(4, 4, dtype=torch.float64))


def test_no_mask_is_plain_attention():
    ref, mod = pair()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(mod(x), ref(x))
    torch.testing.assert_close(mod(x, need_weights=True)[0], ref(x))


def test_key_padding_mask_and_mask_dtypes():
    _, mod = pair()
    mask = lengths_mask([5, 8], 8)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    y = mod(x, mask=mask)
    torch.testing.assert_close(mod(x, key_padding_mask=~mask), y)
    torch.testing.assert_close(mod(x, mask=mask.float()), y)
    torch.testing.assert_close(mod(x, mask=mask.to(torch.int64)), y)
    torch.testing.assert_close(mod(x, key_padding_mask=(~mask).to(torch.uint8)), y)


def test_padding_zero_and_no_nan_even_when_fully_padded():
    _, mod = pair()
    mask = lengths_mask([6, 0, 3], 6)
    x = torch.randn(3, 6, 32, dtype=torch.float64, requires_grad=True)
    for nw in (False, True):
        out = mod(x, mask=mask, need_weights=nw)
        y = out[0] if nw else out
        assert torch.isfinite(y).all()
        assert (y[~mask] == 0).all()
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(gx).all()
        assert (gx[~mask] == 0).all()  # no gradient reaches padding
        out = mod(x, mask=mask, need_weights=nw)
        gp = torch.autograd.grad((out[0] if nw else out).sum(), list(mod.parameters()))
        assert all(torch.isfinite(g).all() for g in gp)


def test_padding_invariance_content_and_amount():
    _, mod = pair()
    lengths = [5, 9, 2]
    xs = [torch.randn(n, 32, dtype=torch.float64) for n in lengths]
    outs = []
    for N, fill in [(9, 0.0), (9, 1e6), (16, float("nan")), (25, float("inf")), (12, None)]:
        x = torch.full((3, N, 32), fill if fill is not None else 0.0, dtype=torch.float64)
        if fill is None:
            x = torch.randn(3, N, 32, dtype=torch.float64) * 100
        for b, t in enumerate(xs):
            x[b, : lengths[b]] = t
        y = mod(x, mask=lengths_mask(lengths, N))
        assert torch.isfinite(y).all() and (y[~lengths_mask(lengths, N)] == 0).all()
        outs.append([y[b, :n] for b, n in enumerate(lengths)])
    for b in range(len(lengths)):
        alone = mod(xs[b][None])[0]  # the sequence with no padding at all
        for o in outs:
            torch.testing.assert_close(o[b], alone)


def test_packed_path_matches_padded_path():
    _, mod = pair()
    mask = lengths_mask([6, 0, 3, 10], 10)
    x = torch.randn(4, 10, 32, dtype=torch.float64, requires_grad=True)
    mod.pack_padding = False
    y = mod(x, mask=mask)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, *mod.parameters()], gy)
    mod.pack_padding = True  # CPU: packs, then SDPA per sequence (CUDA uses varlen FlashAttention)
    yp = mod(x, mask=mask)
    torch.testing.assert_close(yp, y)
    assert (yp[~mask] == 0).all()
    for a, b in zip(torch.autograd.grad(yp, [x, *mod.parameters()], gy), g):
        torch.testing.assert_close(a, b)
    assert (mod(x, mask=torch.zeros(4, 10)) == 0).all()
    assert not mod._use_packed(x, None, False) and not mod._use_packed(x, mask, True)


def test_condition_tokens():
    pm = lengths_mask([3, 1], 4).float()
    got = prepend_condition_mask(pm, 2)
    assert got.dtype == torch.bool
    assert torch.equal(got, jit_condition_mask(pm, 2).bool())
    assert torch.equal(prepend_condition_mask(pm.bool(), 0), pm.bool())
    # The whole JiT path: image mask -> patch mask -> + condition tokens -> attention.
    img = torch.zeros(2, 16, 16)
    img[0, :12, :8] = 1
    img[1] = 1
    mask = prepend_condition_mask(maskattn.patch_mask(img, 4), 1)
    _, mod = pair()
    y = mod(torch.randn(2, 17, 32, dtype=torch.float64), mask=mask)
    assert (y[~mask] == 0).all() and (y[mask] != 0).all()
    with pytest.raises(ValueError, match="mask must be"):
        prepend_condition_mask(torch.ones(4), 1)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_bf16_head_dims(head_dim):
    torch.manual_seed(head_dim)
    heads = 2
    mod = MaskedSelfAttention(head_dim * heads, heads)
    mask = lengths_mask([20, 33, 7], 33)
    x = torch.randn(3, 33, head_dim * heads)
    y32 = mod(x, mask=mask)
    mb = mod.to(torch.bfloat16)
    for nw in (False, True):
        out = mb(x.bfloat16(), mask=mask, need_weights=nw)
        y = out[0] if nw else out
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and (y[~mask] == 0).all()
        torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)


def test_compile_fullgraph():
    _, mod = pair(dtype=torch.float32)
    mask = lengths_mask([3, 8], 8)
    x = torch.randn(2, 8, 32, requires_grad=True)
    cf = torch.compile(mod, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cf(x.detach(), mask=mask), mod(x.detach(), mask=mask))
    cw = torch.compile(lambda t, m: mod(t, mask=m, need_weights=True), fullgraph=True)
    y, w = cw(x, mask)
    (g1,) = torch.autograd.grad(y.sum() + w.sum(), x)
    y2, w2 = mod(x, mask=mask, need_weights=True)
    (g2,) = torch.autograd.grad(y2.sum() + w2.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_dropout_runs_in_training():
    mod = MaskedSelfAttention(32, 4, attn_drop=0.5, proj_drop=0.1).train()
    mask = lengths_mask([3, 8], 8)
    y = mod(torch.randn(2, 8, 32), mask=mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MaskedSelfAttention(30, 4)
    mod = MaskedSelfAttention(32, 4)
    x = torch.randn(2, 8, 32)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\] = \[2, 8\]"):
        mod(x, mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        mod(x, key_padding_mask=torch.ones(8))
    with pytest.raises(ValueError, match="not both"):
        mod(x, mask=torch.ones(2, 8), key_padding_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, N, 32\]"):
        mod(torch.randn(2, 8, 16))


@requires_cuda
def test_cuda_bf16_matches_cpu():
    torch.manual_seed(0)
    mod = MaskedSelfAttention(256, 4)
    mask = lengths_mask([100, 256, 0, 17], 256)
    x = torch.randn(4, 256, 256)
    y = mod(x, mask=mask)
    mc = mod.cuda().bfloat16()
    for nw, pack in ((False, None), (False, False), (True, None)):
        mc.pack_padding = pack
        out = mc(x.cuda().bfloat16(), mask=mask.cuda(), need_weights=nw)
        yc = out[0] if nw else out
        torch.testing.assert_close(yc.float().cpu(), y, atol=3e-2, rtol=3e-2)
    assert mc._use_packed(x.cuda().bfloat16(), mask.cuda(), False)


# ---------------------------------------------------------------- FlashAttention varlen routing


def test_varlen_predicate_follows_flash_attention_limits(monkeypatch):
    from maskattn import _attention

    monkeypatch.setattr(_attention, "_varlen_attn", object())  # whatever this torch has, the kernel "exists"
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for hd in (8, 16, 64, 80, 128, 256):
        assert _attention.varlen_takes(cuda, bf16, hd) and _attention.varlen_takes(cuda, f16, hd), hd
    for hd in (1, 4, 12, 60, 100, 250, 264, 512):  # not a multiple of 8, or above 256
        assert not _attention.varlen_takes(cuda, bf16, hd), hd
    assert not _attention.varlen_takes(cuda, f32, 64) and not _attention.varlen_takes(cpu, bf16, 64)
    monkeypatch.setattr(_attention, "_varlen_attn", None)  # a torch without varlen_attn
    assert not _attention.varlen_takes(cuda, bf16, 64)


@pytest.mark.parametrize("head_dim, varlen", [(16, True), (12, False), (264, False)])
def test_packed_route_calls_varlen_only_for_supported_head_dims(monkeypatch, head_dim, varlen):
    # CPU stands in for CUDA: the routing sees "cuda", and varlen_attn is a recorder that computes
    # FlashAttention's result with SDPA per sequence. Unsupported head dims must never reach it.
    from types import SimpleNamespace

    from maskattn import _attention
    from maskattn.nn import masked_self_attention as msa

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        calls.append(q.shape)
        cu = cu_q.tolist()
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale
            ).transpose(0, 1)
            for a, b in zip(cu, cu[1:])
        ]
        return torch.cat(outs, 0)

    real_ok = _attention.varlen_takes
    monkeypatch.setattr(_attention, "_varlen_attn", fake_varlen)
    as_if_cuda = lambda device, dtype, hd: real_ok(torch.device("cuda"), dtype, hd)  # noqa: E731
    monkeypatch.setattr(_attention, "varlen_takes", as_if_cuda)
    monkeypatch.setattr(msa, "varlen_takes", as_if_cuda)
    torch.manual_seed(head_dim)
    mod = MaskedSelfAttention(2 * head_dim, 2).to(torch.bfloat16)
    mask = lengths_mask([5, 0, 9], 9)
    x = torch.randn(3, 9, 2 * head_dim, dtype=torch.bfloat16)
    cuda_like = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert mod._use_packed(cuda_like, mask, False) == varlen  # automatic routing
    mod.pack_padding = False
    ref = mod(x, mask=mask)
    mod.pack_padding = True  # forced packing: varlen only where it is supported, else SDPA per sequence
    got = mod(x, mask=mask)
    assert bool(calls) == varlen
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got[~mask] == 0).all()


@requires_cuda
@pytest.mark.parametrize("head_dim", [12, 264])
def test_cuda_bf16_unsupported_head_dims_take_sdpa(head_dim):
    torch.manual_seed(head_dim)
    mod = MaskedSelfAttention(2 * head_dim, 2)
    mask = lengths_mask([40, 0, 17, 64], 64)
    x = torch.randn(4, 64, 2 * head_dim)
    ref = mod.double()(x.double(), mask=mask).float()
    mc = mod.cuda().bfloat16()
    xc, mcuda = x.cuda().bfloat16(), mask.cuda()
    assert not mc._use_packed(xc, mcuda, False)
    outs = []
    for pack in (None, False, True):  # automatic, SDPA, forced packing (SDPA per sequence)
        mc.pack_padding = pack
        y = mc(xc, mask=mcuda)
        assert torch.isfinite(y).all() and (y[~mcuda] == 0).all()
        torch.testing.assert_close(y.float().cpu(), ref, atol=3e-2, rtol=3e-2)
        outs.append(y)
    assert torch.equal(outs[0], outs[1])  # the automatic route is the SDPA route
