import pytest
import torch
from conftest import DEVICES, requires_cuda  # noqa: E402
from reference_masked_attention_pool import AttentionAggregator, aggregator_pool, reference_pool, reference_pool_packed

import maskattn

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make(B, N, D, K=None, dtype=torch.float32, device="cpu", p_valid=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lshape = (B, N) if K is None else (B, N, K)
    logits = (torch.randn(lshape, generator=g) * 2).to(device=device, dtype=dtype)
    feats = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    mask = torch.rand(B, N, generator=g) < p_valid
    if N:
        mask[:, 0] = True  # no empty bag unless a test asks for one
    return logits, feats, mask.to(device)


def assert_close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- parity with the ABMIL aggregator


def test_module_matches_abmil_aggregator_forward_and_backward():
    torch.manual_seed(0)
    theirs = AttentionAggregator(64, 32)
    ours = maskattn.nn.AttentionPooling(64, 32)
    ours.load_state_dict(theirs.state_dict())  # same parameter names: the aggregator's checkpoint loads
    x = torch.randn(4, 50, 64)
    mask = torch.rand(4, 50) < 0.8
    mask[:, 0] = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    p1, w1 = theirs(x1, mask)
    p2, w2 = ours(x2, mask)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2, w1, atol=1e-6, rtol=1e-5)
    assert (w2[~mask] == 0).all()  # exact zeros where the -1e9 fill leaves ~1e-430-ish residue
    gp = torch.randn_like(p1)
    gw = torch.randn_like(w1)
    ((p1 * gp).sum() + (w1 * gw).sum()).backward()
    ((p2 * gp).sum() + (w2 * gw).sum()).backward()
    # the aggregator's softmax gives padding a gradient path of exactly 0 too, so grads agree everywhere
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    for (n, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_aggregator_gives_uniform_weights_to_empty_bag_we_give_zeros():
    l, f, m = make(2, 6, 3)
    m[1] = False
    _, ws = aggregator_pool(l, f, m)
    p, w = maskattn.masked_attention_pool(l, f, m)
    assert torch.allclose(ws[1], torch.full((6,), 1 / 6))  # the -1e9 fill averages an empty bag's padding
    assert (w[1] == 0).all() and (p[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [None, 1, 3])
def test_forward_backward_against_reference(device, dtype, K):
    B, N, D = 3, 37, 20
    logits, feats, mask = make(B, N, D, K, dtype, device)
    mask[2] = False  # one empty bag
    logits.requires_grad_()
    feats.requires_grad_()
    pooled, weights = maskattn.masked_attention_pool(logits, feats, mask)
    assert pooled.dtype == dtype and weights.dtype == dtype
    assert pooled.shape == ((B, D) if K is None else (B, K, D)) and weights.shape == logits.shape
    lr = logits.detach().double().requires_grad_()
    fr = feats.detach().double().requires_grad_()
    pr, wr = reference_pool(lr, fr, mask)
    assert_close(pooled, pr, dtype)
    assert_close(weights, wr, dtype)
    gp, gw = torch.randn_like(pr), torch.randn_like(wr)
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    ((pr * gp).sum() + (wr * gw).sum()).backward()
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(logits.grad.double(), lr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(feats.grad.double(), fr.grad, atol=tol, rtol=tol)
    assert (logits.grad[~mask] == 0).all() and (feats.grad[~mask] == 0).all()


# ---------------------------------------------------------------- gradcheck / compile (opcheck: test_op_registry.py)


@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first", "sliced"])
def test_gradcheck(K, layout):
    B, N, D = 3, 9, 5
    logits, feats, mask = make(B, N, D, K, torch.float64)
    mask[1] = False
    logits.requires_grad_()
    if layout == "channels_first":
        base = feats.transpose(1, 2).contiguous().requires_grad_()  # [B, D, N]

        def fn(l, fb):
            return maskattn.masked_attention_pool(l, fb.transpose(1, 2), mask)
    elif layout == "sliced":
        base = torch.randn(B, N, 2 * D, dtype=torch.float64, requires_grad=True)

        def fn(l, fb):
            return maskattn.masked_attention_pool(l, fb[..., ::2], mask)
    else:
        base = feats.requires_grad_()

        def fn(l, fb):
            return maskattn.masked_attention_pool(l, fb, mask)

    assert torch.autograd.gradcheck(fn, (logits, base))


def test_gradcheck_packed():
    offsets = torch.tensor([0, 4, 4, 11, 12])
    logits = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, f: maskattn.masked_attention_pool_packed(l, f, offsets), (logits, feats))
    l1 = logits[:, 0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda l, f: maskattn.masked_attention_pool_packed(l, f, offsets), (l1, feats))


def test_torch_compile_fullgraph_module_and_permuted_inputs():
    torch.manual_seed(0)
    mod = maskattn.nn.AttentionPooling(16, 8, gated=True)
    x = torch.randn(3, 11, 16)
    mask = torch.rand(3, 11) < 0.6
    mask[:, 0] = True
    eager = mod(x, mask)
    compiled = torch.compile(mod, fullgraph=True)(x, mask)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)

    def step(l, fcf, m):  # channels-first features, transposed inside the graph
        p, w = maskattn.masked_attention_pool(l, fcf.transpose(1, 2), m)
        return p.sum() + (w * w).sum()

    l = torch.randn(3, 11, requires_grad=True)
    fcf = torch.randn(3, 16, 11, requires_grad=True)
    out_e = step(l, fcf, mask)
    ge = torch.autograd.grad(out_e, (l, fcf))
    out_c = torch.compile(step, fullgraph=True)(l, fcf, mask)
    gc = torch.autograd.grad(out_c, (l, fcf))
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- padding semantics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 2])
def test_padding_content_and_amount_change_nothing(device, K):
    B, N, D = 4, 30, 12
    logits, feats, mask = make(B, N, D, K, torch.float32, device)
    mask[3] = False
    outs = []
    for variant in ("zeros", "noise", "nan", "more_padding"):
        l, f, m = logits.clone(), feats.clone(), mask.clone()
        pad = ~m
        if variant == "noise":
            l[pad] = 1e4
            f[pad] = torch.randn_like(f[pad]) * 1e6
        elif variant == "nan":
            l[pad] = float("nan")
            f[pad] = float("inf")
        elif variant == "more_padding":
            extra = 17
            l = torch.cat([l, torch.full_like(l[:, :extra], float("nan"))], 1)
            f = torch.cat([f, torch.full_like(f[:, :extra], float("nan"))], 1)
            m = torch.cat([m, torch.zeros_like(m[:, :extra])], 1)
        else:
            l[pad] = 0
            f[pad] = 0
        l.requires_grad_()
        f.requires_grad_()
        p, w = maskattn.masked_attention_pool(l, f, m)
        (p.square().sum() + w.square().sum()).backward()
        outs.append((p, w[:, :N], l.grad[:, :N], f.grad[:, :N]))
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_padded_bags_give_zeros_and_zero_grads(device):
    logits, feats, mask = make(3, 10, 4, None, torch.float32, device)
    mask[:] = False
    logits[0] = float("-inf")
    logits.requires_grad_()
    feats.requires_grad_()
    p, w = maskattn.masked_attention_pool(logits, feats, mask)
    assert (p == 0).all() and (w == 0).all()
    (p.sum() + w.sum()).backward()
    assert (logits.grad == 0).all() and (feats.grad == 0).all()
    # valid positions whose logits are all -inf take no weight either
    l2, f2, m2 = make(2, 5, 3)
    l2[0] = float("-inf")
    p2, w2 = maskattn.masked_attention_pool(l2, f2, m2)
    assert (w2[0] == 0).all() and (p2[0] == 0).all() and torch.isfinite(p2).all()


@pytest.mark.parametrize(
    "mdtype",
    [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16, torch.float64],
)
def test_mask_dtypes(mdtype):
    logits, feats, mask = make(2, 13, 6)
    ref = maskattn.masked_attention_pool(logits, feats, mask)
    m = mask.to(mdtype) * (3 if mdtype not in (torch.bool,) else 1)  # any nonzero counts as valid
    got = maskattn.masked_attention_pool(logits, feats, m)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_mask_equals_all_valid_and_plain_softmax():
    logits, feats, _ = make(2, 9, 4)
    p, w = maskattn.masked_attention_pool(logits, feats)
    torch.testing.assert_close(w, torch.softmax(logits, 1))
    torch.testing.assert_close(p, torch.bmm(w.unsqueeze(1), feats).squeeze(1))


def test_strided_inputs_read_in_place():
    B, N, D = 3, 40, 24
    logits, feats, mask = make(B, N, D)
    ref = maskattn.masked_attention_pool(logits, feats, mask)
    variants = [
        (logits.t().contiguous().t(), feats, mask),  # transposed logits storage
        (logits, feats.transpose(1, 2).contiguous().transpose(1, 2), mask),  # channels-first features
        (logits, feats.permute(1, 0, 2).contiguous().permute(1, 0, 2), mask),  # N-major batch
        (logits, torch.cat([feats, feats], 2)[..., ::2].contiguous() * 0 + feats, mask),
        (
            torch.stack([logits, logits], -1)[..., 0],
            torch.stack([feats, feats], -1)[..., 1],
            mask[:, None, :].expand(B, 2, N)[:, 0],
        ),
        (logits, feats, mask.t().contiguous().t()),
    ]
    for l, f, m in variants:
        got = maskattn.masked_attention_pool(l, f, m)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_extreme_logits():
    logits, feats, mask = make(2, 50, 8)
    logits = logits * 5e3  # +-1e4 range
    p, w = maskattn.masked_attention_pool(logits, feats, mask)
    pr, wr = reference_pool(logits, feats, mask)
    assert torch.isfinite(p).all() and torch.isfinite(w).all()
    assert_close(p, pr, torch.float32)
    assert_close(w, wr, torch.float32)


def test_nan_logit_poisons_only_its_own_bag():
    logits, feats, mask = make(3, 8, 4)
    logits[1, 0] = float("nan")
    p, w = maskattn.masked_attention_pool(logits, feats, mask)
    assert torch.isnan(w[1, mask[1]]).all()
    assert torch.isfinite(p[[0, 2]]).all() and torch.isfinite(w[[0, 2]]).all()


def test_zero_sizes():
    for B, N, D in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        l = torch.randn(B, N, requires_grad=True)
        f = torch.randn(B, N, D, requires_grad=True)
        p, w = maskattn.masked_attention_pool(l, f, torch.ones(B, N, dtype=torch.bool))
        assert p.shape == (B, D) and w.shape == (B, N)
        assert (p == 0).all() or N > 0
        (p.sum() + w.sum()).backward()
        assert l.grad.shape == l.shape and f.grad.shape == f.shape


# ---------------------------------------------------------------- frozen features: no [B,N,D] gradient


def test_frozen_features_compute_no_feature_gradient():
    logits, feats, mask = make(2, 16, 8)
    _, w = maskattn.masked_attention_pool(logits, feats, mask)
    gp = torch.randn(2, 8)
    gl, gf = torch.ops.maskattn._masked_attention_pool_backward(gp, None, w, feats, [True, False])
    assert gf.numel() == 0 and gl.shape == logits.shape
    gl2, gf2 = torch.ops.maskattn._masked_attention_pool_backward(gp, None, w, feats, [True, True])
    torch.testing.assert_close(gl, gl2, atol=0, rtol=0)
    assert gf2.shape == feats.shape
    # through autograd: the saved tensors are the weights and the inputs only
    l = logits.clone().requires_grad_()
    p, w = maskattn.masked_attention_pool(l, feats, mask)
    saved = _saved_tensors(p.grad_fn)
    assert len(saved) == 2  # the weights and the features, nothing else
    big = [t for t in saved if t.numel() > w.numel() and t.data_ptr() != feats.data_ptr()]
    assert big == []
    p.sum().backward()
    assert feats.grad is None


def _saved_tensors(fn):
    out = []
    for name in dir(fn):
        if name.startswith("_saved_"):
            v = getattr(fn, name)
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out + [t for t in getattr(fn, "saved_tensors", ())]


# ---------------------------------------------------------------- packed and the bridges


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 3])
def test_packed_equals_padded(device, K):
    logits, feats, mask = make(4, 25, 10, K, torch.float64, device)
    mask[2] = False
    l1, f1 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    p1, w1 = maskattn.masked_attention_pool(l1, f1, mask)
    lp, offsets = maskattn.pack(l1, mask)
    fp, _ = maskattn.pack(f1, mask)
    p2, w2 = maskattn.masked_attention_pool_packed(lp, fp, offsets)
    torch.testing.assert_close(p2, p1)
    torch.testing.assert_close(w2, w1[mask])
    pr, wr = reference_pool_packed(lp.detach().cpu(), fp.detach().cpu(), offsets.cpu())
    torch.testing.assert_close(p2.cpu(), pr)
    g = torch.randn_like(p1)
    ga = torch.autograd.grad((p1 * g).sum() + w1.square().sum(), (l1, f1))
    gb = torch.autograd.grad((p2 * g).sum() + w2.square().sum(), (l1, f1))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_pack_unpack_round_trip_with_gradients():
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 0, 2, 7)]
    padded, mask = maskattn.pad_sequences(seqs)
    assert padded.shape == (4, 7, 3) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 0, 2, 7]
    padded.requires_grad_()
    packed, offsets = maskattn.pack(padded, mask)
    assert offsets.tolist() == [0, 5, 5, 7, 14]
    torch.testing.assert_close(packed, torch.cat(seqs))
    back, m2 = maskattn.unpack(packed, offsets)
    assert torch.equal(m2, mask)
    torch.testing.assert_close(back, padded.detach() * mask[..., None])
    assert torch.autograd.gradcheck(lambda x: maskattn.unpack(maskattn.pack(x, mask)[0], offsets, 9)[0], (padded,))
    wide, m3 = maskattn.unpack(packed, offsets, max_len=9)
    assert wide.shape == (4, 9, 3) and m3.sum() == 14


def test_pack_drops_interior_padding():
    x = torch.arange(6.0).reshape(1, 6, 1)
    m = torch.tensor([[1, 0, 1, 1, 0, 1]])
    packed, offsets = maskattn.pack(x, m)
    assert packed.flatten().tolist() == [0.0, 2.0, 3.0, 5.0] and offsets.tolist() == [0, 4]


# ---------------------------------------------------------------- errors name the argument


def test_bad_inputs_raise_with_names_and_shapes():
    l, f, m = make(2, 5, 3)
    op = maskattn.masked_attention_pool
    with pytest.raises(RuntimeError, match=r"features must be \[B, N, D\], got shape \[2, 5\]"):
        op(l, f[..., 0], m)
    with pytest.raises(RuntimeError, match=r"logits must be \[B, N\] or \[B, N, K\], got shape \[2\]"):
        op(l[:, 0], f, m)
    with pytest.raises(RuntimeError, match=r"logits \[2, 4\] and features \[2, 5, 3\] must agree"):
        op(l[:, :4], f, m)
    with pytest.raises(RuntimeError, match=r"mask must be \[B, N\] = \[2, 5\].*got shape \[2, 4\]"):
        op(l, f, m[:, :4])
    with pytest.raises(RuntimeError, match=r"logits \(Double\) and features \(Float\) must have the same dtype"):
        op(l.double(), f, m)
    with pytest.raises(RuntimeError, match=r"features must be float32, float64, float16 or bfloat16, got Long"):
        op(l, f.long(), m)
    with pytest.raises(RuntimeError, match=r"mask must be a bool, integer or floating tensor"):
        op(l, f, m.to(torch.complex64))
    packed = maskattn.masked_attention_pool_packed
    lp, fp = torch.randn(6), torch.randn(6, 3)
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0, got 1"):
        packed(lp, fp, torch.tensor([1, 6]))
    with pytest.raises(RuntimeError, match=r"non-decreasing, but offsets\[2\] = 2 < offsets\[1\] = 4"):
        packed(lp, fp, torch.tensor([0, 4, 2, 6]))
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] = 5 must equal T = features.size\(0\) = 6"):
        packed(lp, fp, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match=r"offsets must be int64, got Int"):
        packed(lp, fp, torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"offsets must be 1-D \[B\+1\]"):
        packed(lp, fp, torch.tensor([[0, 6]]))
    with pytest.raises(RuntimeError, match=r"logits \[5\] and features \[6, 3\] must agree in T"):
        packed(lp[:5], fp, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"AttentionPooling: features must be \[B, N, 8\] .* got shape \(2, 5, 3\)"):
        maskattn.nn.AttentionPooling(8)(f)
    with pytest.raises(ValueError, match=r"pack: mask must be \[B, N\]"):
        maskattn.pack(f, m[:, :3])
    with pytest.raises(ValueError, match=r"pad_sequences: seqs\[1\] has shape \(2, 4\)"):
        maskattn.pad_sequences([torch.zeros(3, 3), torch.zeros(2, 4)])


@requires_cuda
def test_mixed_devices_raise():
    l, f, m = make(2, 5, 3)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        maskattn.masked_attention_pool(l.cuda(), f, m)


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("branches", [1, 3])
def test_attention_pooling_module(gated, branches):
    torch.manual_seed(0)
    mod = maskattn.nn.AttentionPooling(12, 8, gated=gated, branches=branches, dropout=0.1).eval()
    x = torch.randn(2, 9, 12, requires_grad=True)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    pooled, weights, scores = mod(x, mask, return_scores=True)
    K = () if branches == 1 else (branches,)
    assert pooled.shape == (2, *K, 12) and weights.shape == (2, 9, *K) and scores.shape == weights.shape
    valid = mask != 0
    torch.testing.assert_close(scores[valid], mod.scores(x)[valid])
    assert (scores[~valid] == 0).all()  # padding is never scored
    pr, wr = reference_pool(scores.detach(), x.detach(), mask)
    torch.testing.assert_close(pooled.double(), pr, atol=1e-5, rtol=1e-5)
    pooled.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())
    if gated:
        names = {n for n, _ in mod.named_parameters()}
        assert {"attention_v.0.weight", "attention_u.0.weight", "attention_w.weight"} <= names


def test_build_info():
    info = maskattn.build_info()
    assert info["torch_version"] == maskattn._build_info.TORCH_VERSION
    assert info["torch_target"] == maskattn._build_info.TORCH_TARGET
    assert isinstance(info["with_cuda"], bool)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_low_precision(dtype):
    l, f, m = make(2, 9, 6)
    l.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        p, w = maskattn.masked_attention_pool(l, f, m)
    assert p.dtype == dtype and w.dtype == dtype
    pr, wr = reference_pool(l.detach().to(dtype), f.to(dtype), m)
    assert_close(p, pr, dtype)
    p.float().sum().backward()
    assert l.grad.dtype == torch.float32 and torch.isfinite(l.grad).all()


def test_double_backward_raises():
    l = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    f = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)
    p, _ = maskattn.masked_attention_pool(l, f)
    gl, _ = torch.autograd.grad(p.sum(), (l, f), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(gl.sum(), l)
