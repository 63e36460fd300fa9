"""Pure-PyTorch references for masked_softmax and MaskedSelfAttention: JiT's padded-image attention
(timm-style qkv/proj with a masked_fill(-inf) key mask), its masked loss, and the Transformer
key-padding mask built from token ids, kept verbatim in their arithmetic so that tests and
benchmarks compare against what users run today."""

import torch
import torch.nn as nn


class MultiHeadAttention(nn.Module):
    """JiT's attention (timm-style qkv/proj Linear layers) with the masked_fill(-inf) key mask."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attention_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if attention_mask is not None:
            mask_expanded = attention_mask.unsqueeze(1).unsqueeze(2)  # [B, 1, 1, N]
            attn = attn.masked_fill(mask_expanded == 0, float("-inf"))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def jit_block_output(attn: MultiHeadAttention, x, patch_mask):
    """JiT's attention followed by its 'zero the padding patches' step (x * patch_mask)."""
    return attn(x, attention_mask=patch_mask) * patch_mask.unsqueeze(-1)


def jit_masked_loss(pred_img, clean, mask):
    """JiT's masked loss: sum over C x pixels divided by the pixel count."""
    mask_expanded = mask.unsqueeze(1)
    diff = (pred_img - clean) ** 2
    masked_diff = diff * mask_expanded
    return masked_diff.sum() / (mask_expanded.sum() + 1e-8)


def jit_masked_softmax(scores, mask, scale=1.0, dim=-1):
    """JiT's / the Transformer key-padding mask: masked_fill(-inf) then softmax (NaN on fully masked rows)."""
    return (scores * scale).masked_fill(mask == 0, float("-inf")).softmax(dim)


def token_padding_softmax(scores, inputs):
    """The Transformer key-padding mask from token ids (0 = pad), -1e9 fill, softmax."""
    padding_mask = inputs == 0
    return scores.masked_fill(padding_mask.unsqueeze(1).unsqueeze(2), -1e9).softmax(-1)
