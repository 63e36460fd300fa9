"""Pure-PyTorch references for MaskedSelfAttention with qk-norm and rotary embeddings, written from
the definitions of JiT ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025)
and timm's ViT ``Attention``, with the parameter names those models use, so that their state dicts
load into maskattn's modules with ``strict=True``:

* JiT's RMSNorm (weight ones, eps 1e-6, normalised in float32, weight applied in float32, cast back;
  float64 stays float64 here and in JiT's float32 logits, for the float64 checks),
* JiT's 2-D rotary embedding over the patch grid (EVA's "fast" form: precomputed cos / sin, rotation
  of adjacent channel pairs, cos 1 / sin 0 rows for the in-context tokens),
* JiT's attention (qk RMSNorm, rope, logits and softmax in float32 with autocast off) and timm's
  (LayerNorm qk-norm, ``F.scaled_dot_product_attention``),
* JiT's block (adaLN modulation, SwiGLU MLP) and a small JiT-like model with in-context tokens,
* the hand-written padded versions a user writes for padded images: the key mask threaded through
  every block, ``masked_fill(-inf)`` before the softmax, padded outputs zeroed.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _at_least_float32(t):
    # JiT writes t.float(); its models run in bfloat16 or float32, where this is the same, and the
    # float64 checks keep float64.
    return t if t.dtype == torch.float64 else t.float()


class RMSNorm(nn.Module):
    """JiT's RMSNorm: x / sqrt(mean(x^2) + eps) in float32, times the weight in float32, cast back."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        h = _at_least_float32(hidden_states)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * h).to(input_dtype)


def rotate_adjacent_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation of EVA's / JiT's rotary embedding."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack((-second, first), dim=-1).reshape(x.shape)


class VisionRotaryEmbeddingFast(nn.Module):
    """2-D rotary embedding over a ``grid x grid`` patch grid: half of each head's channels rotate
    with the row index, half with the column index; ``num_cls_token`` rows of cos 1 / sin 0 come
    first for the in-context tokens (they are not rotated)."""

    def __init__(self, dim, pt_seq_len=16, ft_seq_len=None, theta=10000, num_cls_token=0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        ft_seq_len = pt_seq_len if ft_seq_len is None else ft_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]
        grid = freqs.shape[0]
        freqs = torch.cat(
            [freqs[:, None, :].expand(grid, grid, dim), freqs[None, :, :].expand(grid, grid, dim)], dim=-1
        ).reshape(grid * grid, 2 * dim)
        cos, sin = freqs.cos(), freqs.sin()
        if num_cls_token > 0:
            cos = torch.cat([torch.ones(num_cls_token, 2 * dim), cos], 0)
            sin = torch.cat([torch.zeros(num_cls_token, 2 * dim), sin], 0)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, t):
        return t * self.freqs_cos + rotate_adjacent_pairs(t) * self.freqs_sin


def jit_sdpa(query, key, value, dropout_p=0.0, attention_mask=None):
    """JiT's attention core: logits and softmax in float32 with autocast off, then the weighted sum.

    ``attention_mask`` ([B, N], nonzero = valid) is what a padded-image user adds: masked_fill(-inf)
    on the keys (NaN for a sample without valid tokens, as the hand-written code gives)."""
    scale = 1.0 / math.sqrt(query.size(-1))
    with torch.autocast(device_type=query.device.type, enabled=False):
        attn = _at_least_float32(query) @ _at_least_float32(key).transpose(-2, -1) * scale
        if attention_mask is not None:
            attn = attn.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        attn = torch.softmax(attn, dim=-1)
    attn = torch.dropout(attn, dropout_p, train=True)
    if not torch.is_autocast_enabled(query.device.type):
        attn = attn.to(value.dtype)
    return attn @ value


class Attention(nn.Module):
    """JiT's attention (``qk_norm=True``: per-head RMSNorm of q and k), ``forward(x, rope)``; the
    optional ``attention_mask`` is the padded-image user's addition (key mask + zeroed outputs)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_norm=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope=None, attention_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rope is not None:
            q = rope(q)
            k = rope(k)
        x = jit_sdpa(q, k, v, self.attn_drop if self.training else 0.0, attention_mask)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        return x


class TimmAttention(nn.Module):
    """timm's ViT ``Attention`` (qk-norm with ``norm_layer``, fused SDPA); ``attn_mask`` as timm
    passes it to ``F.scaled_dot_product_attention`` (bool, True = attend)."""

    def __init__(
        self,
        dim,
        num_heads=8,
        qkv_bias=False,
        qk_norm=False,
        proj_bias=True,
        attn_drop=0.0,
        proj_drop=0.0,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.0, bias=True):
        super().__init__()
        hidden_dim = int(hidden_dim * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


class JiTBlock(nn.Module):
    """JiT's block: adaLN modulation from the condition ``c`` [B, C], attention with rope, SwiGLU.

    ``attn`` may be replaced (the block is the same code whichever attention module it holds);
    ``attention_mask`` is forwarded only when given (the hand-written padded model threads it)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, attn=None):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=True)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio), drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, feat_rope=None, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if attention_mask is None:
            a = self.attn(h, rope=feat_rope)
        else:
            a = self.attn(h, rope=feat_rope, attention_mask=attention_mask)
        x = x + gate_msa.unsqueeze(1) * a
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyJiT(nn.Module):
    """A small JiT-like denoiser: patch embedding, class condition, in-context class tokens
    prepended at block ``in_context_start`` (they get the cos 1 / sin 0 rope rows), rope on every
    block, the final adaLN layer and unpatchify.

    ``forward(x, y, image_mask=None)``: with a mask, the hand-written padded model: the patch mask
    (mean over each patch > 0.5, in-context tokens valid) is threaded through every block's
    attention. ``attn_factory(hidden, heads)`` builds each block's attention."""

    def __init__(
        self,
        input_size=32,
        patch_size=8,
        in_channels=3,
        hidden_size=48,
        depth=2,
        num_heads=4,
        num_classes=10,
        in_context_len=2,
        in_context_start=1,
        attn_factory=None,
    ):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.y_embedder = nn.Embedding(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, hidden_size) * 0.02)
        self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, hidden_size) * 0.02)
        half_head_dim = hidden_size // num_heads // 2
        self.feat_rope = VisionRotaryEmbeddingFast(half_head_dim, pt_seq_len=self.grid)
        self.feat_rope_incontext = VisionRotaryEmbeddingFast(
            half_head_dim, pt_seq_len=self.grid, num_cls_token=in_context_len
        )
        self.blocks = nn.ModuleList(
            [
                JiTBlock(hidden_size, num_heads, attn=attn_factory(hidden_size, num_heads) if attn_factory else None)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

    def embed(self, x, y):
        c = self.y_embedder(y)
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed, c

    def in_context_tokens(self, c):
        return c.unsqueeze(1).repeat(1, self.in_context_len, 1) + self.in_context_posemb

    def patch_mask(self, image_mask):
        B, H, W = image_mask.shape
        p = self.patch_size
        m = image_mask.reshape(B, H // p, p, W // p, p).float().mean(dim=(2, 4))
        return (m > 0.5).float().reshape(B, -1)

    def unpatchify(self, x):
        B, p, g = x.shape[0], self.patch_size, self.grid
        x = x.reshape(B, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, self.in_channels, g * p, g * p)

    def forward(self, x, y, image_mask=None):
        x, c = self.embed(x, y)
        mask = None if image_mask is None else self.patch_mask(image_mask)
        for i, block in enumerate(self.blocks):
            if i == self.in_context_start:
                x = torch.cat([self.in_context_tokens(c), x], dim=1)
                if mask is not None:
                    mask = torch.cat([torch.ones(x.shape[0], self.in_context_len, dtype=mask.dtype), mask], 1)
            rope = self.feat_rope if i < self.in_context_start else self.feat_rope_incontext
            x = block(x, c, rope) if mask is None else block(x, c, rope, attention_mask=mask)
        x = x[:, self.in_context_len :] if self.in_context_start < len(self.blocks) else x
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def hand_written_masked_loss(pred, target, image_mask):
    """The usual padded-image loss: squared error summed over channels and valid pixels, divided by
    the number of valid pixels."""
    m = image_mask.unsqueeze(1).to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (m.sum() + 1e-8)
