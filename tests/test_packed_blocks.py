"""PackedBlocks / packed_forward: a stack of JiT blocks (written from the paper's definition, with
MaskedSelfAttention as their attention) run on valid tokens only gives what the hand-written padded
JiT gives - outputs and every gradient - on every device, for every rope form; padding invariance;
the plain path for batches without padding; a whole JiT-like model with in-context tokens."""

import pytest
import torch
from conftest import DEVICES
from reference_masked_self_attention import JiTBlock, TinyJiT, VisionRotaryEmbeddingFast, hand_written_masked_loss

import maskattn
from maskattn.nn import MaskedSelfAttention, PackedBlocks, packed_forward, prepend_condition_mask

C, HEADS, GRID = 48, 4, 4
N = GRID * GRID


def lengths_mask(lengths, n, device="cpu"):
    return torch.arange(n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def ours_attn(dim, heads):
    return MaskedSelfAttention(dim, heads, qkv_bias=True, qk_norm=True)


def stacks(depth=2, dtype=torch.float64, device="cpu", seed=0):
    """(hand-written JiT blocks, the same blocks with MaskedSelfAttention, weights loaded strictly)."""
    torch.manual_seed(seed)
    ref = torch.nn.ModuleList([JiTBlock(C, HEADS) for _ in range(depth)])
    with torch.no_grad():
        for p in ref.parameters():  # adaLN is zero-initialised in JiT; give every path a say
            p.add_(torch.randn_like(p) * 0.1)
    ours = PackedBlocks([JiTBlock(C, HEADS, attn=ours_attn(C, HEADS)) for _ in range(depth)])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device, dtype), ours.to(device, dtype)


def run_ref(blocks, x, mask, c, rope):
    for blk in blocks:
        x = blk(x, c, rope, attention_mask=mask.to(x.dtype))
    return x * mask[..., None]


def inputs(B=4, device="cpu", dtype=torch.float64, lengths=(16, 0, 7, 11)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    c = torch.randn(B, C, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    return x, c, lengths_mask(list(lengths), N, device)


def grads_of(y, tensors, g):
    return torch.autograd.grad(y, tensors, g, allow_unused=True)


def named_grads(y, leaves, module, g):
    """{leaf index or parameter name: gradient} (JiT registers q_norm before qkv, ours after)."""
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(y, [*leaves, *params], g, allow_unused=True)
    return dict(zip((*range(len(leaves)), *names), grads))


def assert_same_grads(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")  # noqa: B023


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pack", [True, False])
def test_matches_hand_written_padded_jit_blocks(device, pack):
    ref, ours = stacks(device=device)
    ours.pack = pack
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID).to(device, torch.float64)
    x, c, mask = inputs(device=device)
    keep = [0, 2, 3]  # sample 1 has no valid token: the hand-written masked_fill(-inf) gives NaN
    y_ref = run_ref(ref, x[keep], mask[keep], c[keep], rope)
    assert torch.isnan(run_ref(ref, x, mask, c, rope)[1]).all()
    y = ours(x, mask, c, rope)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()
    torch.testing.assert_close(y[keep], y_ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    g[1] = 0
    assert_same_grads(named_grads(y, [x, c], ours, g), named_grads(y_ref, [x, c], ref, g[keep]), 1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_form", ["module", "cos_sin", "callable", "none"])
@pytest.mark.parametrize("run_per_sample", [True, False])
def test_packed_route_equals_padded_route(device, rope_form, run_per_sample):
    _, ours = stacks(device=device)
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID).to(device, torch.float64)
    r = {
        "module": rope,
        "cos_sin": (rope.freqs_cos, rope.freqs_sin),
        "callable": lambda t: rope(t),
        "none": None,
    }[rope_form]
    x, c, _ = inputs(device=device)
    mask = torch.rand(4, N, device=device) > 0.5  # padding anywhere
    mask[0] = True
    mask[1] = False
    params = list(ours.parameters())
    ours.pack = False
    y = ours(x, mask, c, r)
    g = torch.randn_like(y)
    ref_grads = grads_of(y, [x, c, *params], g)
    ours.pack, ours.run_per_sample = True, run_per_sample
    yp = ours(x, mask, c, r)
    torch.testing.assert_close(yp, y, atol=1e-12, rtol=1e-12)
    assert (yp[~mask] == 0).all()
    for a, b in zip(grads_of(yp, [x, c, *params], g), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_per_sample_modules_run_on_sample_rows_and_tokens_are_packed():
    _, ours = stacks()
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID).double()
    x, c, mask = inputs()
    rows = {}

    def record(name):
        def hook(module, args):
            rows.setdefault(name, []).append(args[0].shape[0])

        return hook

    handles = [
        ours[0].adaLN_modulation.register_forward_pre_hook(record("adaLN")),
        ours[0].mlp.register_forward_pre_hook(record("mlp")),
        ours[0].attn.register_forward_pre_hook(record("attn")),
    ]
    T = int(mask.sum())
    ours(x, mask, c, rope)
    assert rows == {"adaLN": [4], "mlp": [T], "attn": [T]}  # B rows of modulation, T tokens elsewhere
    rows.clear()
    ours.run_per_sample = False
    ours(x, mask, c, rope)
    assert rows == {"adaLN": [T], "mlp": [T], "attn": [T]}
    rows.clear()
    ours.run_per_sample = True
    full = torch.ones_like(mask)
    y = ours(x, full, c, rope)  # no padding: the plain loop, on [B, N, C], no mask
    assert rows == {"adaLN": [4], "mlp": [4], "attn": [4]}
    for h in handles:
        h.remove()
    y_plain = x
    for blk in ours:
        y_plain = blk(y_plain, c, rope)
    assert torch.equal(y, y_plain)
    assert torch.equal(ours(x, None, c, rope), y_plain)


def test_padding_invariance_content_and_amount():
    _, ours = stacks()
    lengths = [9, 3, 16]
    xs = [torch.randn(n, C, dtype=torch.float64) for n in lengths]
    c = torch.randn(3, C, dtype=torch.float64)
    params = list(ours.parameters())
    outs, grads = [], []
    for n_pad, fill in [(16, 0.0), (20, float("nan")), (25, float("inf")), (16, -1e6)]:
        x = torch.full((3, n_pad, C), fill, dtype=torch.float64)
        for b, t in enumerate(xs):
            x[b, : lengths[b]] = t
        x.requires_grad_()
        m = lengths_mask(lengths, n_pad)
        for pack in (True, False):
            ours.pack = pack
            y = ours(x, m, c)
            assert torch.isfinite(y).all() and (y[~m] == 0).all()
            outs.append([y[b, :n] for b, n in enumerate(lengths)])
            gx, *gp = torch.autograd.grad(y.sum(), [x, *params])
            assert (gx[~m] == 0).all()
            grads.append(gp)
    for b in range(len(lengths)):
        alone = ours(xs[b][None], None, c[b : b + 1])[0]
        for o in outs:
            torch.testing.assert_close(o[b], alone, atol=1e-12, rtol=1e-12)
    for gp in grads[1:]:  # parameter gradients depend neither on the padding's content nor its amount
        for a, b in zip(gp, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


class MaskattnJiT(TinyJiT):
    """TinyJiT as a user ports it: MaskedSelfAttention in the blocks (weights load unchanged) and
    the block loop replaced by PackedBlocks around the in-context tokens."""

    def __init__(self, **kw):
        super().__init__(attn_factory=ours_attn, **kw)
        self.blocks = PackedBlocks(self.blocks)

    def forward(self, x, y, image_mask=None):
        x, c = self.embed(x, y)
        mask = None if image_mask is None else maskattn.patch_mask(image_mask, self.patch_size)
        s = self.in_context_start
        x = self.blocks[:s](x, mask, c, self.feat_rope)
        x = torch.cat([self.in_context_tokens(c), x], dim=1)
        mask = None if mask is None else prepend_condition_mask(mask, self.in_context_len)
        x = self.blocks[s:](x, mask, c, self.feat_rope_incontext)
        return self.unpatchify(self.final_layer(x[:, self.in_context_len :], c))


@pytest.mark.parametrize("device", DEVICES)
def test_whole_jit_like_model_step(device):
    torch.manual_seed(0)
    kw = dict(input_size=32, patch_size=8, hidden_size=C, depth=3, num_heads=HEADS, in_context_len=2)
    ref = TinyJiT(**kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = MaskattnJiT(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(device, torch.float64), ours.to(device, torch.float64)
    img = torch.randn(3, 3, 32, 32, dtype=torch.float64, device=device)
    target = torch.randn_like(img)
    y = torch.tensor([1, 4, 7], device=device)
    image_mask = torch.zeros(3, 32, 32, device=device)
    image_mask[0] = 1
    image_mask[1, :24, :16] = 1  # sizes on the patch grid: each patch all valid or all padding
    image_mask[2, :8, :32] = 1
    loss_ref = hand_written_masked_loss(ref(img, y, image_mask), target, image_mask)
    out = ours(img, y, image_mask)
    loss = maskattn.losses.masked_mse_loss(out, target, image_mask, reduction="pixel_mean")
    torch.testing.assert_close(loss, loss_ref, atol=0, rtol=1e-10)  # the hand-written "+ 1e-8" moves 7e-12
    torch.testing.assert_close(out * image_mask[:, None], ref(img, y, image_mask) * image_mask[:, None])
    assert_same_grads(named_grads(loss, [], ours, None), named_grads(loss_ref, [], ref, None), 1e-11)
    # without a mask both are the plain model
    torch.testing.assert_close(ours(img, y), ref(img, y), atol=1e-12, rtol=1e-12)


class CheckpointedBlock(torch.nn.Module):
    """A JiT block whose forward runs under activation checkpointing (recomputed in the backward)."""

    def __init__(self, block, use_reentrant):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x, c, rope):
        return torch.utils.checkpoint.checkpoint(self.block, x, c, rope, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant,run_per_sample", [(False, False), (True, True), (True, False)])
def test_activation_checkpointing_inside_the_blocks(use_reentrant, run_per_sample):
    # the recomputed attention runs in the backward, outside packed_forward: it must still attend
    # within each sample
    _, ours = stacks()
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID).double()
    x, c, mask = inputs()
    params = list(ours.parameters())
    ours.pack = False
    y = ours(x, mask, c, rope)
    g = torch.randn_like(y)
    ref = grads_of(y, [x, c, *params], g)
    ck = PackedBlocks([CheckpointedBlock(b, use_reentrant) for b in ours], run_per_sample=run_per_sample)
    yc = ck(x, mask, c, rope)
    torch.testing.assert_close(yc, y, atol=1e-12, rtol=1e-12)
    yc.backward(g)  # the reentrant checkpoint refuses autograd.grad
    for t, b in zip([x, c, *params], ref):
        torch.testing.assert_close(t.grad, b, atol=1e-12, rtol=1e-12)


def test_non_reentrant_checkpoint_with_per_sample_shortcut_fails_loudly():
    # documented: the recomputation runs adaLN on T rows instead of B; the checkpoint notices
    _, ours = stacks()
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID).double()
    x, c, mask = inputs()
    ck = PackedBlocks([CheckpointedBlock(b, use_reentrant=False) for b in ours], run_per_sample=True)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        ck(x, mask, c, rope).sum().backward()
    whole = torch.utils.checkpoint.checkpoint(ours, x, mask, c, rope, use_reentrant=False)
    g = torch.randn_like(whole)
    grads = grads_of(whole, [x, c, *ours.parameters()], g)
    for a, b in zip(grads, grads_of(ours(x, mask, c, rope), [x, c, *ours.parameters()], g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_slices_keep_settings_and_state_dict_keys():
    _, ours = stacks(depth=3)
    ours.pack, ours.run_per_sample = False, False
    part = ours[1:]
    assert isinstance(part, PackedBlocks) and len(part) == 2 and part.pack is False and not part.run_per_sample
    assert isinstance(ours[0], JiTBlock)
    assert "0.attn.q_norm.weight" in ours.state_dict()


def test_compile_padded_route_fullgraph():
    _, ours = stacks(dtype=torch.float32)
    rope = VisionRotaryEmbeddingFast(C // HEADS // 2, pt_seq_len=GRID)
    x, c, mask = inputs(dtype=torch.float32)
    eager = ours(x, mask, c, rope)
    cf = torch.compile(lambda a, m, cc: ours(a, m, cc, rope), fullgraph=True)  # pack=None: padded route
    torch.testing.assert_close(cf(x, mask, c), eager)


def test_errors():
    ref, ours = stacks()
    x, c, mask = inputs()
    with pytest.raises(ValueError, match="hold no maskattn.nn.MaskedSelfAttention"):
        packed_forward(ref, x, mask, c)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\] = \[4, 16\]"):
        ours(x, mask[:, :5], c)
    with pytest.raises(TypeError, match="mask must be a real or bool tensor"):
        ours(x, mask.to(torch.complex64), c)
    with pytest.raises(ValueError, match="x must be a \\[B, N, C\\] tensor"):
        ours(x[0], mask, c)

    class NeedsWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MaskedSelfAttention(C, HEADS)

        def forward(self, h):
            return self.attn(h, need_weights=True)[0]

    with pytest.raises(ValueError, match="need_weights=True is not available inside PackedBlocks"):
        packed_forward([NeedsWeights()], x.float().detach(), mask)

    class Drops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MaskedSelfAttention(C, HEADS)

        def forward(self, h):
            return self.attn(h)[:1]

    with pytest.raises(ValueError, match="must return the packed tokens"):
        packed_forward([Drops()], x.float().detach(), mask)
