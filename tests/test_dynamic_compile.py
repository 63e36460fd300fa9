"""Every module and public function under torch.compile(fullgraph=True, dynamic=True), inductor.

Each test compiles one function that runs a module (or a group of functions) in *every documented
input form* - with and without a mask, key_padding_mask, need_weights, return_scores, shared and
per-batch prototypes, values given or not, [B, D] queries, feature- and image-resolution masks,
branches > 1, gated - then calls it at two different sizes (every dim changes) and checks:

* the compiled outputs and gradients equal the eager ones;
* the second size reuses the first graph: no recompile (dynamic=True makes every size symbolic
  from the first call, so a recompile would mean a size got specialised).

The forms share one compiled function per module because compiling is the slow part (seconds per
graph on a small CPU); a failure names the line of the form that broke. The first sizes are all
distinct from each other and from the fixed dims: Dynamo's duck sizing would otherwise give equal
sizes one symbol and recompile when they part.

Left out: ``pack`` (its output size is the number of valid rows, a value of the mask: it syncs by
design and cannot be one graph) and ``MaskedSelfAttention``'s packed varlen route (eager only, for
the same reason; under torch.compile the module takes the SDPA route, compiled here).
"""

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICES

import maskattn
import maskattn.nn as mnn
from maskattn import losses, masks


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, device="cpu", grad=False):
    return torch.randn(shape, generator=_g(seed)).to(device).requires_grad_(grad)


def _mask(*shape, seed=0, device="cpu", p=0.6):
    m = torch.rand(shape, generator=_g(seed)) < p
    m.view(-1, shape[-1])[:, 0] = True
    return m.to(device)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _grads(outs, inputs):
    outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    want = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad]
    if not outs or not want:
        return []
    # A fixed projection of each output (not .sum(): softmax weights sum to a constant).
    loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
    return [g for g in torch.autograd.grad(loss, want, allow_unused=True) if g is not None]


def check_dynamic(fn, make_inputs, sizes, params=(), atol=1e-5, rtol=1e-5, grad=True, allowed_frames=None):
    """Compile ``fn`` once (inductor, fullgraph, dynamic) and compare it with eager at every size.

    Returns the number of frames compiled. ``allowed_frames``: how many compiles are expected in
    all (default: those of the first call only, i.e. no recompile)."""
    torch._dynamo.reset()  # nothing cached by an earlier test (same code object, other parameters)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames_after_first = None
    for size in sizes:
        args = make_inputs(*size)
        # On CUDA the eager kernels (SDPA, cuBLAS) and inductor's reduce in other orders.
        if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            atol, rtol = max(atol, 1e-4), max(rtol, 1e-4)
        with torch.set_grad_enabled(grad):
            eager = _flat(fn(*args))
            got = _flat(compiled(*args))
        assert len(got) == len(eager)
        for i, (a, b) in enumerate(zip(got, eager)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"size {size}: output {i}"
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"size {size}: output {i}")
        ge, gc = (_grads(eager, [*args, *params]), _grads(got, [*args, *params])) if grad else ([], [])
        assert len(ge) == len(gc)
        for i, (a, b) in enumerate(zip(gc, ge)):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"size {size}: gradient {i}")
        if frames_after_first is None:
            frames_after_first = counter.frame_count
            assert frames_after_first >= 1
    # The first call may count twice (Dynamo restarts its analysis of a frame once it has learnt
    # which Python scalars to turn into tensors); any later size must reuse that graph.
    expected = frames_after_first if allowed_frames is None else allowed_frames
    assert counter.frame_count <= expected, f"sizes {sizes[1:]} recompiled the graph of {sizes[0]}"
    return counter.frame_count


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("device", DEVICES)
def test_attention_pooling_every_form(device):
    torch.manual_seed(0)
    plain = mnn.AttentionPooling(8, hidden_dim=6).to(device)
    gated = mnn.AttentionPooling(8, hidden_dim=6, gated=True, branches=2).to(device)

    def fn(x, mask, fmask):
        return (
            plain(x),  # no mask
            plain(x, mask, return_scores=True),  # bool mask, scores
            gated(x, fmask),  # gated, K branches, a float mask
        )

    def inputs(B, N):
        mask = _mask(B, N, seed=N, device=device)
        return _randn(B, N, 8, seed=B, device=device, grad=True), mask, mask.float() * 0.4

    check_dynamic(fn, inputs, [(3, 11), (5, 17)], params=[*plain.parameters(), *gated.parameters()])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_self_attention_every_form(device):
    torch.manual_seed(0)
    attn = mnn.MaskedSelfAttention(8, num_heads=2).to(device).eval()
    forced = mnn.MaskedSelfAttention(8, num_heads=2).to(device).eval()
    forced.load_state_dict(attn.state_dict())
    forced.pack_padding = True  # eager-only packing: compiled, it takes the SDPA route

    def fn(x, mask):
        return (
            attn(x),
            attn(x, mask=mask),
            attn(x, key_padding_mask=(~mask).to(torch.uint8)),
            attn(x, mask=mask, need_weights=True),
            attn(x, need_weights=True),
            forced(x, mask=mask),
        )

    def inputs(B, N):
        mask = _mask(B, N, seed=N, device=device)
        mask[0] = False  # a sample without valid tokens: zeros, not NaN
        return _randn(B, N, 8, seed=B, device=device, grad=True), mask

    check_dynamic(fn, inputs, [(3, 11), (5, 17)], params=list(attn.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_learnable_scale_cross_attention_every_form(device):
    torch.manual_seed(0)
    shared = mnn.LearnableScaleCrossAttention(8).to(device)
    after_step = mnn.LearnableScaleCrossAttention(8, init_scale=5.0, clamp="after_step", normalize=False).to(device)

    def fn(q3, q2, protos, protos_b, values, values_b, key_mask, key_mask_b):
        return (
            shared(q3, protos),  # [B, Lq, D] queries, shared [Lk, D] prototypes, values = prototypes
            shared(q3, protos, values, key_mask=key_mask),  # shared values [Lk, Dv], a [Lk] mask
            after_step(q2, protos_b, values_b, key_mask=key_mask_b),  # [B, D] queries, per-batch everything
        )

    def inputs(B, Lq, Lk):
        return (
            _randn(B, Lq, 8, seed=1, device=device, grad=True),
            _randn(B, 8, seed=2, device=device, grad=True),
            _randn(Lk, 8, seed=3, device=device, grad=True),
            _randn(B, Lk, 8, seed=4, device=device, grad=True),
            _randn(Lk, 12, seed=5, device=device, grad=True),
            _randn(B, Lk, 12, seed=6, device=device, grad=True),
            _mask(Lk, seed=7, device=device),
            _mask(B, Lk, seed=8, device=device).to(torch.int32),
        )

    check_dynamic(
        fn, inputs, [(3, 5, 7), (4, 9, 6)], params=[shared.logit_scale_log, after_step.logit_scale_log], atol=2e-5
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_spatial_attention_pool_every_form(device, training):
    torch.manual_seed(0)
    pool = mnn.SpatialAttentionPool(4, hidden=6).to(device)

    def fn(x, feature_mask, image_mask, soft_image_mask):
        return (
            pool(x),
            pool(x, feature_mask),  # [B, H, W] at feature resolution
            pool(x, image_mask),  # [B, Hm, Wm] at image resolution (counted per cell)
            pool(x, soft_image_mask),  # [B, 1, Hm, Wm], soft float values
        )

    def inputs(B, H, W, Hm, Wm):
        image_mask = torch.zeros(B, Hm, Wm, dtype=torch.bool, device=device)
        image_mask[:, Hm // 5 : Hm - 2, 3:] = True
        soft = image_mask[:, None].float() * torch.rand(B, 1, Hm, Wm, generator=_g(1)).to(device)
        return _randn(B, 4, H, W, seed=B, device=device, grad=True), _mask(B, H, W, device=device), image_mask, soft

    # 40 x 56 over 5 x 7: whole 8 x 8 cells; 61 x 100 over 6 x 9: uneven, overlapping cells
    sizes = [(3, 5, 7, 40, 56), (2, 6, 9, 61, 100)]
    if not training:
        check_dynamic(fn, inputs, sizes, grad=False)
        return

    # With gradients, inductor's convolution backward specialises the feature map's height (a
    # channels-last stride check in PyTorch itself, not in maskattn): the convolutions alone
    # recompile as often, and the pooling, mask reduction and fused op add no compile of their own.
    def convolutions_only(x, feature_mask, image_mask, soft_image_mask):
        return pool.gate_logits(x)

    baseline = check_dynamic(convolutions_only, inputs, sizes, params=list(pool.parameters()), allowed_frames=99)
    check_dynamic(fn, inputs, sizes, params=list(pool.parameters()), allowed_frames=baseline)


# ---------------------------------------------------------------- functions


@pytest.mark.parametrize("device", DEVICES)
def test_pooling_and_softmax_functions(device):
    def fn(logits, logits_k, feats, mask, plogits, pfeats, offsets, scores):
        return (
            maskattn.masked_attention_pool(logits, feats, mask),
            maskattn.masked_attention_pool(logits_k, feats),
            maskattn.masked_attention_pool_packed(plogits, pfeats, offsets),
            maskattn.masked_softmax(scores, mask[:, None, None, :].to(torch.float16), -1, 0.5),
            maskattn.masked_softmax(logits, mask, dim=0),
            maskattn.nn.prepend_condition_mask(mask, 2),
        )

    def inputs(B, N):
        lengths = torch.arange(B) % 3 + 2
        T = int(lengths.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
        return (
            _randn(B, N, seed=1, device=device, grad=True),
            _randn(B, N, 2, seed=2, device=device, grad=True),
            _randn(B, N, 9, seed=3, device=device, grad=True),
            _mask(B, N, device=device),
            _randn(T, seed=4, device=device, grad=True),
            _randn(T, 9, seed=5, device=device, grad=True),
            offsets,
            _randn(B, 3, N, N, seed=6, device=device, grad=True),
        )

    # T (the packed rows: 11 and 18), B + 1 and D = 9 differ from N and from each other so that
    # duck sizing keeps them apart
    check_dynamic(fn, inputs, [(4, 13), (6, 19)])


@pytest.mark.parametrize("device", DEVICES)
def test_image_mask_functions(device):
    def fn(image_mask, pred, target, feats, gate):
        H, W = image_mask.shape[-2:]
        pm = maskattn.patch_mask(image_mask, 4)
        pixel = maskattn.patch_mask_to_image(pm, 4, (H, W))
        return (
            pm,
            pixel,
            losses.masked_mse_loss(pred, target, pixel),
            losses.masked_mse_loss(pred, target, image_mask[:, None], reduction="none"),
            maskattn.gated_masked_mean(feats, gate, image_mask),
        )

    def inputs(B, h, w):
        H, W = 4 * h, 4 * w
        image_mask = (torch.rand(B, H, W, generator=_g(H)) < 0.7).to(torch.uint8).to(device)
        return (
            image_mask,
            _randn(B, 3, H, W, seed=1, device=device, grad=True),
            _randn(B, 3, H, W, seed=2, device=device),
            _randn(B, 5, H, W, seed=3, device=device, grad=True),
            _randn(B, 1, H, W, seed=4, device=device, grad=True),
        )

    # Inductor's CPU reductions pick an accumulator by size and guard on numel <= 4096: every
    # reduction here (B*H*W and B*C*H*W elements) stays above it at both sizes.
    check_dynamic(fn, inputs, [(2, 12, 13), (4, 14, 15)])


@pytest.mark.parametrize("device", DEVICES)
def test_padding_functions(device):
    def fn(packed, offsets, like):
        # max_len from a tensor's size: symbolic, so no host sync and no recompile
        return maskattn.unpack(packed, offsets, max_len=like.shape[0])

    def inputs(B, N):
        lengths = (torch.arange(B) * 7) % N + 1
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
        return _randn(int(lengths.sum()), 3, seed=1, device=device, grad=True), offsets, torch.empty(N)

    check_dynamic(fn, inputs, [(3, 11), (5, 17)])


@pytest.mark.parametrize("device", DEVICES)
def test_face_mask_functions(device):
    def fn(images):
        return (
            masks.content_based(images),
            maskattn.transforms.apply_face_mask(images, masks.ellipse(images.shape[-2], images.shape[-1])),
        )

    def inputs(B, H, W):
        images = torch.zeros(B, 3, H, W)
        images[0, :, 2 : H - 2, 3 : W - 3] = 0.8  # one face; the others blank: they take the fallback
        return (images.to(device),)

    check_dynamic(fn, inputs, [(2, 13, 17), (3, 19, 23)])
