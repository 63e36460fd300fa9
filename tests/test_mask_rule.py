"""One mask rule everywhere: nonzero = valid, for every mask dtype.

Every public function and module that takes a mask is run with the same mask in every bool, integer
and floating dtype - valid positions holding assorted nonzero values (0.4, -1, 1e-30, subnormals,
inf, NaN: NaN is nonzero, so valid), padding holding 0 and -0.0 - and must give exactly the result
(outputs and gradients) it gives for the bool mask. A complex mask must be rejected by each of them
with an error that names the function and the argument.

The one documented exception is a *blend weight*: ``transforms.apply_face_mask`` and
``masks.content_based``'s ``fallback`` use a floating mask by value (soft face edges); their bool and
integer masks follow the rule (tested below).
"""

import itertools

import pytest
import torch
from conftest import DEVICES

import maskattn
import maskattn.nn as mnn
from maskattn import losses, masks, transforms

MASK_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def _nonzero_values(dtype):
    """Values that are nonzero in ``dtype``, including the ones a value-based rule gets wrong."""
    if dtype == torch.bool:
        return [True]
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return [v for v in (1, 2, -1, 7, info.max, info.min) if v != 0]
    fi = torch.finfo(dtype)
    # 0.4 (below a 0.5 threshold if averaged), -1 (negative), tiny and subnormal (round to nothing
    # if summed in low precision), inf and NaN (nonzero, so valid; NaN compares != 0).
    vals = [0.4, -1.0, 1e-30, fi.tiny, fi.tiny / 4, float("inf"), float("nan"), 3.0]
    return [v for v in vals if torch.tensor(v, dtype=dtype).item() != 0 or v != v]


def as_dtype(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``valid`` (bool) as a ``dtype`` mask with varied nonzero values and zeros of both signs."""
    if dtype == torch.bool:
        return valid.clone()
    vals = _nonzero_values(dtype)
    flat = valid.reshape(-1)
    out = torch.zeros(flat.shape, dtype=dtype, device=valid.device)
    idx = flat.nonzero().squeeze(1)
    out[idx] = torch.tensor(list(itertools.islice(itertools.cycle(vals), idx.numel())), dtype=dtype).to(valid.device)
    if dtype.is_floating_point:
        zeros = (~flat).nonzero().squeeze(1)
        out[zeros[::2]] = -0.0
    out = out.view(valid.shape)
    assert torch.equal(out != 0, valid), f"{dtype}: the test mask does not encode the valid positions"
    return out


def _rand_valid(*shape, p=0.6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(shape, generator=g) < p
    return v.to(device)


def _randn(*shape, seed=0, device="cpu", dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


def _with_grads(outputs, inputs):
    """outputs + the gradients of a fixed random projection of them w.r.t. ``inputs``."""
    outs = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    if not outs:
        return list(outputs)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [i for i in inputs if i.requires_grad], allow_unused=True)
    return list(outputs) + [g for g in grads if g is not None]


# ---- every public function / module taking a mask: (name, valid-mask factory, call(mask, device))


def _pool(mask, device):
    logits, feats = _randn(3, 7, seed=1, device=device, grad=True), _randn(3, 7, 5, seed=2, device=device, grad=True)
    return _with_grads(maskattn.masked_attention_pool(logits, feats, mask), [logits, feats])


def _pool_k(mask, device):
    logits, feats = _randn(3, 7, 2, seed=1, device=device, grad=True), _randn(3, 7, 5, seed=2, device=device)
    return _with_grads(maskattn.masked_attention_pool(logits, feats, mask), [logits])


def _channel_pool(mask, device):  # PyG's feature-level gate: one logit per row and channel
    logits, feats = _randn(3, 7, 5, seed=1, device=device, grad=True), _randn(3, 7, 5, seed=2, device=device, grad=True)
    return _with_grads(maskattn.masked_channel_attention_pool(logits, feats, mask), [logits, feats])


def _softmax_key(mask, device):  # a [B, 1, 1, N] key mask broadcast over [B, H, N, N]
    s = _randn(2, 3, 6, 6, seed=3, device=device, grad=True)
    return _with_grads([maskattn.masked_softmax(s, mask, -1, 0.5)], [s])


def _softmax_full(mask, device):
    s = _randn(4, 6, seed=3, device=device, grad=True)
    return _with_grads([maskattn.masked_softmax(s, mask, dim=0)], [s])


def _gated(mask, device):
    f, g = _randn(2, 3, 4, 5, seed=4, device=device, grad=True), _randn(2, 1, 4, 5, seed=5, device=device, grad=True)
    return _with_grads(maskattn.gated_masked_mean(f, g, mask), [f, g])


def _xattn(mask, device):
    q, k, v = (_randn(*s, seed=i, device=device, grad=True) for i, s in enumerate([(2, 3, 4), (6, 4), (6, 3)]))
    ls = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    return _with_grads(maskattn.scaled_cross_attention(q, k, v, ls, 100.0, mask, True), [q, k, v, ls])


def _pack(mask, device):
    x = _randn(3, 5, 2, seed=6, device=device, grad=True)
    packed, offsets = maskattn.pack(x, mask)
    return _with_grads([packed], [x]) + [offsets]


def _mse(mask, device):
    p, t = _randn(2, 3, 4, 4, seed=7, device=device, grad=True), _randn(2, 3, 4, 4, seed=8, device=device)
    return _with_grads([losses.masked_mse_loss(p, t, mask), losses.masked_mse_loss(p, t, mask, "none")], [p])


def _module(cls, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw).double()


def _attention_pooling(mask, device):
    m = _module(mnn.AttentionPooling, 5, hidden_dim=6, gated=True, branches=2).to(device)
    x = _randn(3, 7, 5, seed=9, device=device, grad=True)
    return _with_grads(m(x, mask, return_scores=True), [x, *m.parameters()])


def _self_attention(mask, device, **kw):
    m = _module(mnn.MaskedSelfAttention, 8, num_heads=2).to(device)
    x = _randn(3, 6, 8, seed=10, device=device, grad=True)
    out = m(x, **{kw.pop("arg", "mask"): mask}, **kw)
    return _with_grads(out if isinstance(out, tuple) else [out], [x, *m.parameters()])


def _self_attention_packed(mask, device):
    m = _module(mnn.MaskedSelfAttention, 8, num_heads=2).to(device)
    m.pack_padding = True
    x = _randn(3, 6, 8, seed=10, device=device, grad=True)
    return _with_grads([m(x, mask=mask)], [x, *m.parameters()])


def _lsca(mask, device):
    m = _module(mnn.LearnableScaleCrossAttention, 4).to(device)
    q, protos = _randn(2, 3, 4, seed=11, device=device, grad=True), _randn(2, 6, 4, seed=12, device=device)
    return _with_grads(m(q, protos, key_mask=mask), [q, *m.parameters()])


def _sap(mask, device):
    m = _module(mnn.SpatialAttentionPool, 3, hidden=4).to(device)
    x = _randn(2, 3, 5, 7, seed=13, device=device, grad=True)
    return _with_grads(m(x, mask), [x, *m.parameters()])


CASES = {
    # name: (valid-mask shape, call)
    "masked_attention_pool": ((3, 7), _pool),
    "masked_attention_pool-K": ((3, 7), _pool_k),
    "masked_channel_attention_pool": ((3, 7), _channel_pool),
    "masked_softmax-key_mask": ((2, 1, 1, 6), _softmax_key),
    "masked_softmax-full": ((4, 6), _softmax_full),
    "patch_mask": ((2, 8, 12), lambda m, d: [maskattn.patch_mask(m, 4, 0.25)]),
    "patch_mask-4d": ((2, 1, 8, 12), lambda m, d: [maskattn.patch_mask(m, 2)]),
    "patch_mask_to_image": ((2, 6), lambda m, d: [maskattn.patch_mask_to_image(m, 2, (4, 6))]),
    "gated_masked_mean": ((2, 4, 5), _gated),
    "scaled_cross_attention-[Lk]": ((6,), _xattn),
    "scaled_cross_attention-[B,Lk]": ((2, 6), _xattn),
    "pack": ((3, 5), _pack),
    "losses.masked_mse_loss-[B,H,W]": ((2, 4, 4), _mse),
    "losses.masked_mse_loss-full": ((2, 3, 4, 4), _mse),
    "nn.AttentionPooling": ((3, 7), _attention_pooling),
    "nn.MaskedSelfAttention-mask": ((3, 6), _self_attention),
    "nn.MaskedSelfAttention-key_padding_mask": ((3, 6), lambda m, d: _self_attention(m, d, arg="key_padding_mask")),
    "nn.MaskedSelfAttention-need_weights": ((3, 6), lambda m, d: _self_attention(m, d, need_weights=True)),
    "nn.MaskedSelfAttention-packed": ((3, 6), _self_attention_packed),
    "nn.prepend_condition_mask": ((3, 5), lambda m, d: [mnn.prepend_condition_mask(m, 2)]),
    "nn.LearnableScaleCrossAttention": ((2, 6), _lsca),
    "nn.SpatialAttentionPool-feature_resolution": ((2, 5, 7), _sap),
    "nn.SpatialAttentionPool-[B,1,H,W]": ((2, 1, 5, 7), _sap),
    "nn.SpatialAttentionPool-image_resolution": ((2, 40, 56), _sap),
    "nn.SpatialAttentionPool-image_resolution_uneven": ((2, 13, 30), _sap),
}


def _valid_for(name, shape, device):
    v = _rand_valid(*shape, device=device, seed=len(name))
    if name.startswith("masked_softmax") or name.startswith("nn.MaskedSelfAttention"):
        v.view(-1, v.shape[-1])[0] = False  # one fully masked row / sample: zeros, not NaN
    return v


def _assert_identical(got, ref, what):
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {i}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{what}: output {i} differs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_mask_dtype_gives_the_bool_result(name, device):
    shape, call = CASES[name]
    valid = _valid_for(name, shape, device)
    ref = call(valid, device)
    for dtype in MASK_DTYPES[1:]:
        _assert_identical(call(as_dtype(valid, dtype), device), ref, f"{name} with a {dtype} mask")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_complex_mask_is_rejected(name, device):
    shape, call = CASES[name]
    mask = _valid_for(name, shape, device).to(torch.complex64)
    fn = name.split("-")[0].split(".")[-1]
    with pytest.raises(TypeError, match=rf"{fn}: .*must be a bool, integer or floating tensor, got complex64") as e:
        call(mask, device)
    assert isinstance(e.value, RuntimeError)  # what the ops' C++ checks raise for the same mistake


def test_every_mask_taking_function_is_covered():
    covered = {n.split("-")[0] for n in CASES} | {"transforms.apply_face_mask", "masks.content_based"}
    expected = {
        "masked_attention_pool",
        "masked_channel_attention_pool",
        "masked_softmax",
        "patch_mask",
        "patch_mask_to_image",
        "gated_masked_mean",
        "scaled_cross_attention",
        "pack",
        "losses.masked_mse_loss",
        "nn.AttentionPooling",
        "nn.MaskedSelfAttention",
        "nn.prepend_condition_mask",
        "nn.LearnableScaleCrossAttention",
        "nn.SpatialAttentionPool",
        "transforms.apply_face_mask",
        "masks.content_based",
    }
    assert expected <= covered


def test_test_masks_hold_the_values_a_value_based_rule_gets_wrong():
    # The comparison above only means something if the non-bool masks really hold such values.
    valid = _rand_valid(4, 16)
    for dtype in MASK_DTYPES[1:]:
        m = as_dtype(valid, dtype)
        if dtype.is_floating_point:
            vals = m[valid].double()
            assert torch.isnan(vals).any() and (vals.abs() < 0.5).any() and (vals < 0).any(), dtype
            assert torch.signbit(m[~valid]).any(), dtype  # -0.0 at padding
        elif dtype != torch.uint8:
            assert (m[valid] < 0).any() and (m[valid] > 1).any(), dtype


# ---- blend weights: bool / integer masks follow the rule, floating ones are used by value


@pytest.mark.parametrize("dtype", [d for d in MASK_DTYPES if not d.is_floating_point])
def test_apply_face_mask_integer_masks_keep_every_nonzero_pixel(dtype):
    valid = _rand_valid(2, 6, 6)
    img = (torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ref = transforms.apply_face_mask(img, valid, background=7)
    got = transforms.apply_face_mask(img, as_dtype(valid, dtype), background=7)
    assert torch.equal(got, ref)
    assert torch.equal(ref, torch.where(valid[:, None], img, torch.full_like(img, 7)))  # kept, not scaled


def test_apply_face_mask_floating_mask_is_a_blend_weight():
    img = torch.full((1, 4, 4), 100.0)
    soft = torch.full((4, 4), 0.25)
    assert torch.equal(transforms.apply_face_mask(img, soft, background=20.0), torch.full((1, 4, 4), 40.0))


@pytest.mark.parametrize("dtype", [d for d in MASK_DTYPES if not d.is_floating_point])
def test_content_based_integer_fallback_follows_the_rule(dtype):
    blank = torch.zeros(2, 8, 8)  # covers nothing: every image takes the fallback
    valid = _rand_valid(8, 8)
    ref = masks.content_based(blank, fallback=valid)
    assert torch.equal(ref, valid.float().expand(2, 8, 8))
    assert torch.equal(masks.content_based(blank, fallback=as_dtype(valid, dtype)), ref)
