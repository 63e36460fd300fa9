"""A JiT-style pixel diffusion transformer trained on padded images: one training step (forward,
masked loss, backward) of the hand-written padded model against maskattn's packed block route.

The model follows JiT ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025):
bottleneck patch embedding, class + time condition ``c``, blocks with adaLN modulation, attention
with per-head RMSNorm of q and k (``qk_norm``) and 2-D rotary embeddings, a SwiGLU MLP, in-context
class tokens prepended at block ``in_context_start``, and the adaLN final layer. Images of
different sizes are padded to one square; the patch mask is the mean over each patch ``> 0.5``.

* hand-written (the user's padded model): the patch mask threaded through every block, attention
  ``F.scaled_dot_product_attention`` with a ``[B, 1, 1, N]`` key mask (or JiT's own float32
  ``masked_fill(-inf)`` softmax), padded outputs zeroed, the loss summed over channels per valid
  pixel; every token, valid or not, goes through every projection and MLP.
* maskattn: the same blocks with ``MaskedSelfAttention(qk_norm=True)`` (same weights), the block
  loop replaced by ``PackedBlocks`` (valid tokens packed once per block range, attention per
  sample), ``masked_mse_loss(reduction="pixel_mean")``.

Default: hidden 384, depth 4, 6 heads, patch 8, 16 in-context tokens, padding 0 / 40 / 60 % of the
image area; on CPU 128 px, B=4, float32; on CUDA 256 px, B=16, the step under bfloat16 autocast
(``--jit-size``, ``--jit-batch``, ``--jit-dtype``, ``--jit-padding`` change them).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import maskattn

from ._harness import BASELINE, COMPILED, MASKATTN, REFERENCE, Case, Impl, Layer, maybe_compile

LAYER = Layer(
    "JiT training step, padded images (key-masked attention, all tokens through the MLP)",
    "maskattn.nn.PackedBlocks + MaskedSelfAttention",
)


def add_args(p):
    p.add_argument("--jit-size", type=int, default=None, help="jit_block: image size in pixels (default 128; CUDA 256)")
    p.add_argument("--jit-batch", type=int, default=None, help="jit_block: batch size (default 4; CUDA 16)")
    p.add_argument(
        "--jit-dtype",
        default=None,
        help="jit_block: float32, or bfloat16 / float16 to run the step under autocast (default float32; CUDA bfloat16)",
    )
    p.add_argument(
        "--jit-padding",
        default=None,
        help="jit_block: comma-separated padded fractions of the image area (default 0,0.4,0.6)",
    )


# ---------------------------------------------------------------- the model, from JiT's definition
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def _rotate_pairs(t):
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim, grid, num_cls_token=0, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        freqs = torch.outer(torch.arange(grid).float(), freqs).repeat_interleave(2, -1)  # [grid, dim]
        f = torch.cat([freqs[:, None].expand(grid, grid, dim), freqs[None].expand(grid, grid, dim)], -1)
        f = f.reshape(grid * grid, 2 * dim)
        cos, sin = f.cos(), f.sin()
        if num_cls_token:
            cos = torch.cat([torch.ones(num_cls_token, 2 * dim), cos])
            sin = torch.cat([torch.zeros(num_cls_token, 2 * dim), sin])
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, t):
        return t * self.freqs_cos + _rotate_pairs(t) * self.freqs_sin


class PaddedAttention(nn.Module):
    """JiT's attention with the key mask a padded-image user adds: SDPA with a ``[B, 1, 1, N]``
    boolean mask, or JiT's own core (float32 logits, ``masked_fill(-inf)``, softmax); zeroed rows."""

    def __init__(self, dim, num_heads, core="sdpa"):
        super().__init__()
        self.num_heads, self.core = num_heads, core
        head_dim = dim // num_heads
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, mask):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        key = mask[:, None, None, :]
        if self.core == "sdpa":
            o = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=key != 0)
        else:
            with torch.autocast(x.device.type, enabled=False):
                a = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
                a = a.masked_fill(key == 0, float("-inf")).softmax(-1)
            o = a.to(v.dtype) @ v
        o = self.proj(o.transpose(1, 2).reshape(B, N, C))
        return o * mask.unsqueeze(-1).to(o.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(hidden * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class JiTBlock(nn.Module):
    """JiT's block; ``mask`` is passed to the attention only by the hand-written padded model."""

    def __init__(self, dim, num_heads, attn):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = attn
        self.mlp = SwiGLUFFN(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        a = self.attn(h, rope=rope) if mask is None else self.attn(h, rope, mask)
        x = x + gate1.unsqueeze(1) * a
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class JiT(nn.Module):
    """``attention``: "sdpa" / "masked_fill" (hand-written padded model) or "maskattn"."""

    def __init__(self, size, patch, dim, depth, heads, in_context_len, in_context_start, attention, classes=1000):
        super().__init__()
        self.patch, self.grid, self.attention = patch, size // patch, attention
        self.n_ctx, self.ctx_start = in_context_len, in_context_start
        self.x_embedder = nn.Sequential(nn.Conv2d(3, 128, patch, patch, bias=False), nn.Conv2d(128, dim, 1))
        self.t_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(classes, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2, dim) * 0.02)
        self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, dim) * 0.02)
        self.feat_rope = VisionRotaryEmbeddingFast(dim // heads // 2, self.grid)
        self.feat_rope_incontext = VisionRotaryEmbeddingFast(dim // heads // 2, self.grid, in_context_len)

        def attn():
            if attention == "maskattn":
                return maskattn.nn.MaskedSelfAttention(dim, heads, qk_norm=True)
            return PaddedAttention(dim, heads, core=attention)

        blocks = [JiTBlock(dim, heads, attn()) for _ in range(depth)]
        self.blocks = maskattn.nn.PackedBlocks(blocks) if attention == "maskattn" else nn.ModuleList(blocks)
        self.final_layer = FinalLayer(dim, patch, 3)

    def _time(self, t):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * 1000 * freqs[None]
        return self.t_embedder(torch.cat([args.cos(), args.sin()], -1))

    def forward(self, z, t, y, image_mask):
        B, p, g = z.shape[0], self.patch, self.grid
        c = self._time(t) + self.y_embedder(y)
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed
        ctx = c.unsqueeze(1).repeat(1, self.n_ctx, 1) + self.in_context_posemb
        if self.attention == "maskattn":
            mask = maskattn.patch_mask(image_mask, p)
            x = self.blocks[: self.ctx_start](x, mask, c, self.feat_rope)
            x = torch.cat([ctx, x], 1)
            mask = maskattn.nn.prepend_condition_mask(mask, self.n_ctx)
            x = self.blocks[self.ctx_start :](x, mask, c, self.feat_rope_incontext)
        else:
            mask = (image_mask.reshape(B, g, p, g, p).float().mean(dim=(2, 4)) > 0.5).float().reshape(B, -1)
            for i, block in enumerate(self.blocks):
                if i == self.ctx_start:
                    x = torch.cat([ctx, x], 1)
                    mask = torch.cat([torch.ones(B, self.n_ctx, device=mask.device), mask], 1)
                x = block(x, c, self.feat_rope if i < self.ctx_start else self.feat_rope_incontext, mask)
        x = self.final_layer(x[:, self.n_ctx :], c)
        x = x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, 3, g * p, g * p)


def hand_written_loss(pred, target, image_mask):
    m = image_mask.unsqueeze(1).to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (m.sum() + 1e-8)


def image_masks(B, size, patch, padded_fraction, device):
    """B images of about ``1 - padded_fraction`` of the area each (sizes on the patch grid, varied
    aspect ratios), top-left aligned in a ``size x size`` canvas."""
    if padded_fraction <= 0:
        return torch.ones(B, size, size, device=device)
    g = size // patch
    area = (1.0 - padded_fraction) * g * g
    m = torch.zeros(B, size, size)
    for b in range(B):
        aspect = 0.75 + 0.6 * (b / max(B - 1, 1))  # h / w from 0.75 to 1.35
        h = max(1, min(g, round(math.sqrt(area * aspect))))
        w = max(1, min(g, round(area / h)))
        m[b, : h * patch, : w * patch] = 1
    return m.to(device)


def cases(args):
    dev = args.device
    quick = args.quick
    cuda = dev.type == "cuda"
    dtype_name = getattr(args, "jit_dtype", None) or ("bfloat16" if cuda else "float32")
    amp = getattr(torch, dtype_name)
    size = getattr(args, "jit_size", None) or (64 if quick else 256 if cuda else 128)
    B = getattr(args, "jit_batch", None) or (2 if quick else 16 if cuda else 4)
    pads = getattr(args, "jit_padding", None)
    pads = [float(f) for f in pads.split(",")] if pads else ([0.0, 0.6] if quick else [0.0, 0.4, 0.6])
    dim, depth, heads, patch, n_ctx = (192, 2, 3, 8, 8) if quick else (384, 4, 6, 8, 16)
    ctx_start = max(1, depth // 3)
    torch.manual_seed(0)
    cfg = dict(size=size, patch=patch, dim=dim, depth=depth, heads=heads, in_context_len=n_ctx)
    cfg["in_context_start"] = ctx_start
    models = {kind: JiT(attention=kind, **cfg).to(dev) for kind in ("sdpa", "masked_fill", "maskattn")}
    state = models["sdpa"].state_dict()
    for m in models.values():
        m.load_state_dict(state, strict=True)  # one set of weights, three implementations
    autocast = amp != torch.float32

    def loss_fn(kind, loss):
        model = models[kind]

        def fn(z, t, y, target, image_mask):
            with torch.autocast(dev.type, dtype=amp, enabled=autocast):
                return loss(model(z, t, y, image_mask).float(), target, image_mask)

        return fn

    def ours_loss(pred, target, image_mask):
        return maskattn.losses.masked_mse_loss(pred, target, image_mask, reduction="pixel_mean")

    fns = {
        "sdpa": loss_fn("sdpa", hand_written_loss),
        "masked_fill": loss_fn("masked_fill", hand_written_loss),
        "maskattn": loss_fn("maskattn", ours_loss),
    }
    compiled = maybe_compile(fns["sdpa"], not args.no_compile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, size, size, generator=g).to(dev)
    noise = torch.randn(B, 3, size, size, generator=g).to(dev)
    t = torch.rand(B, generator=g).to(dev)
    y = torch.randint(0, 1000, (B,), generator=g).to(dev)
    z = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    N = (size // patch) ** 2 + n_ctx
    for pad in pads:
        image_mask = image_masks(B, size, patch, pad, dev)
        real_pad = 1.0 - float(image_mask.mean())
        tokens = float(maskattn.patch_mask(image_mask, patch).sum()) + B * n_ctx
        case = (
            f"B={B} {size}px N={N} dim={dim} depth={depth} pad={real_pad:.0%} "
            f"(valid tokens {tokens / (B * N):.0%}) {dtype_name}"
        )
        # the loss of each implementation on the same batch agrees: a mismatch would void the timing
        with torch.no_grad():
            ref = fns["sdpa"](z, t, y, x, image_mask)
            ours = fns["maskattn"](z, t, y, x, image_mask)
        tol = 1e-3 if not autocast else 5e-2
        if not torch.allclose(ref, ours, rtol=tol, atol=tol):
            raise RuntimeError(f"jit_block: maskattn's loss {float(ours)} differs from the hand-written {float(ref)}")

        def step(fn, kind):
            params = [p for p in models[kind].parameters() if p.requires_grad]

            def go():
                loss = fn(z, t, y, x, image_mask)
                return torch.autograd.grad(loss, params)

            return go

        impls = [
            Impl("JiT hand-written padded, SDPA key mask (eager)", step(fns["sdpa"], "sdpa"), BASELINE),
        ]
        if compiled is not None:
            impls.append(Impl("JiT hand-written padded, SDPA key mask (compiled)", step(compiled, "sdpa"), COMPILED))
        impls.append(
            Impl(
                "JiT hand-written padded, masked_fill(-inf) fp32 logits",
                step(fns["masked_fill"], "masked_fill"),
                REFERENCE,
            )
        )
        impls.append(Impl("maskattn PackedBlocks + MaskedSelfAttention", step(fns["maskattn"], "maskattn"), MASKATTN))
        yield Case(LAYER, case, "fwd+bwd", impls, detail="training step: forward, masked loss, backward")
