"""Multi-head self-attention over padded token sequences (padded images as patches, padded text)."""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as _v
from .._ops.masked_softmax import masked_softmax

try:  # torch >= 2.10: FlashAttention over packed sequences (CUDA, half types)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None

_NAME = "MaskedSelfAttention"


def _varlen_ok(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``varlen_attn`` (FlashAttention over packed sequences) runs these inputs.

    FlashAttention takes CUDA float16/bfloat16 with a head dim that is a multiple of 8 and at
    most 256; any other head dim raises inside the kernel, so those go to SDPA instead.
    """
    return (
        _varlen_attn is not None
        and device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def prepend_condition_mask(mask: Tensor, num_condition_tokens: int) -> Tensor:
    """``[B, N]`` valid mask -> bool ``[B, num_condition_tokens + N]`` with the condition tokens valid.

    The JiT rule for class/time condition tokens prepended to the patch tokens: they always take
    part, whatever the image padding (``torch.cat([torch.ones(B, n_cond), patch_mask], 1)``).
    """
    valid = _v.valid_mask(mask, "prepend_condition_mask")
    if mask.dim() != 2:
        raise ValueError(f"prepend_condition_mask: mask must be [B, N], got shape {tuple(mask.shape)}")
    num_condition_tokens = _v.as_int(num_condition_tokens, "prepend_condition_mask", "num_condition_tokens", 0)
    cond = valid.new_ones((valid.shape[0], num_condition_tokens))
    return torch.cat([cond, valid], dim=1)


def _in_func_transform() -> bool:
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _valid_mask(x: Tensor, mask: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is not None and key_padding_mask is not None:
        raise ValueError(
            "MaskedSelfAttention: pass either mask (True = valid) or key_padding_mask (True = pad), not both"
        )
    m = mask if mask is not None else key_padding_mask
    if m is None:
        return None
    name = "mask" if mask is not None else "key_padding_mask"
    _v.check_mask(m, _NAME, name)
    if m.shape != x.shape[:2]:
        raise ValueError(
            f"MaskedSelfAttention: {name} must be [B, N] = {list(x.shape[:2])} to match x "
            f"{tuple(x.shape)}, got shape {tuple(m.shape)}"
        )
    if m.device != x.device:
        raise ValueError(f"MaskedSelfAttention: {name} ({m.device}) and x ({x.device}) must be on the same device")
    valid = _v.valid_mask(m, _NAME, name)
    return ~valid if key_padding_mask is not None else valid


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention that ignores padding tokens, a drop-in for the JiT / timm ``Attention``.

    ``forward(x [B, N, dim], mask=None, key_padding_mask=None, need_weights=False)``:

    * ``mask`` is a valid mask ``[B, N]`` (nonzero = token takes part, e.g. ``patch_mask`` with
      :func:`prepend_condition_mask` for condition tokens); ``key_padding_mask`` is PyTorch's
      convention (True = padding). Pass at most one.
    * Keys at padding get weight exactly 0; outputs at padding are exactly 0; nothing is NaN, even
      for a sample with no valid token (the ``masked_fill(-inf)`` + softmax of the seed gives NaN
      there). Padding inputs are zeroed before the projection, so results for valid tokens depend
      neither on what the padding holds (even inf/NaN) nor on how much of it there is.
    * Gradients reaching padding tokens are exactly 0.

    Routing, fastest correct path first:

    1. CUDA, float16/bfloat16, a head dim that is a multiple of 8 and at most 256 (FlashAttention's
       limits), eager, no ``need_weights``, no active attention dropout, a mask given:
       the valid tokens are *packed* (padding dropped), projected, and attended with
       ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over variable-length sequences),
       then scattered back with zeros at padding. Compute and memory scale with the number of valid
       tokens, so a batch with 30% padding is faster than one with none. Learning the packed size
       costs one host sync per call; set ``module.pack_padding = False`` to avoid it (CUDA graphs),
       or ``True`` to force packing in eager mode (where FlashAttention does not apply - CPU,
       float32, other head dims - the packed sequences then run SDPA one by one: a test path).
       Under ``torch.compile`` path 2 always runs: packing needs the host sync.
    2. Otherwise, without ``need_weights``, the attention runs in ``F.scaled_dot_product_attention`` with
    a boolean ``[B, 1, 1, N]`` key mask - the fastest correct path on CPU (its fused flash kernel,
    measured 2x faster than materialising the scores in float32 and far faster in bfloat16) and on
    CUDA (memory-efficient / cuDNN kernels that never materialise ``[B, H, N, N]``). With
    ``need_weights=True`` the ``[B, H, N, N]`` weights must exist anyway, SDPA cannot return them,
    and the fused :func:`maskattn.masked_softmax` (path 3: scale folded in, one read and one write of the
    scores, zeros instead of NaN on fully masked rows) computes them; ``(y, weights)`` is returned.
    Inside torch.func transforms (``vmap``, ``jvp``, ``jacfwd``, ``grad``) path 3 always runs: SDPA's
    fused kernels have neither batching rules nor forward-mode derivatives, and packing needs
    data-dependent sizes.

    Parameters are named like timm's / JiT's ``Attention`` (``qkv``: Linear(dim, 3 dim),
    ``proj``: Linear(dim, dim)), so the seed's ``MultiHeadAttention`` state dict loads unchanged.
    Half types use float32 accumulation on every path; head dims 64, 80 and 128 are tested in bf16.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        dim = _v.as_int(dim, _NAME, "dim")
        num_heads = _v.as_int(num_heads, _NAME, "num_heads")
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"MaskedSelfAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        qkv_bias = _v.as_bool(qkv_bias, _NAME, "qkv_bias")
        attn_drop = _v.as_probability(attn_drop, _NAME, "attn_drop")
        proj_drop = _v.as_probability(proj_drop, _NAME, "proj_drop")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # None = pack automatically where it is fastest (see the class docstring); a plain attribute,
        # not a constructor argument, so that the timm/JiT signature stays as it is.
        self.pack_padding: Optional[bool] = None

    def _use_packed(self, x: Tensor, valid: Optional[Tensor], need_weights: bool) -> bool:
        # Packing learns the packed size on the host: a graph break, so never under torch.compile;
        # and its index_select/varlen kernels have no batching rules, so never inside torch.func.
        if (
            valid is None
            or need_weights
            or (self.training and self.attn_drop.p > 0)
            or torch.compiler.is_compiling()
            or _in_func_transform()
        ):
            return False
        if self.pack_padding is not None:
            return bool(self.pack_padding)
        return _varlen_ok(x.device.type, x.dtype, self.head_dim)

    def _forward_packed(self, x: Tensor, valid: Tensor) -> Tensor:
        B, N, C = x.shape
        H, hd = self.num_heads, self.head_dim
        lengths = valid.sum(1)
        lens = lengths.tolist()  # the one host sync: T and the longest sequence size the kernels
        T, max_len = sum(lens), max(lens)
        idx = valid.reshape(-1).nonzero().squeeze(1)  # row-major: sequence by sequence, in order
        out = x.new_zeros((B * N, C))
        if T == 0:
            return out.view(B, N, C)
        qkv = self.qkv(x.reshape(B * N, C).index_select(0, idx)).reshape(T, 3, H, hd)
        q, k, v = (t.contiguous() for t in qkv.unbind(1))  # [T, H, hd]
        if _varlen_ok(x.device.type, x.dtype, hd):
            cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
            cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
            o = _varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=self.scale)
        else:
            segs, start = [], 0
            for n in lens:
                if n:
                    seg = [t[start : start + n].transpose(0, 1) for t in (q, k, v)]  # [H, n, hd]
                    segs.append(F.scaled_dot_product_attention(*seg, scale=self.scale).transpose(0, 1))
                start += n
            o = torch.cat(segs, 0)
        y = self.proj_drop(self.proj(o.reshape(T, C)))
        return out.index_copy(0, idx, y).view(B, N, C)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        _v.check_floating(x, _NAME, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MaskedSelfAttention: x must be [B, N, {self.dim}], got shape {tuple(x.shape)}")
        B, N, C = x.shape
        valid = _valid_mask(x, mask, key_padding_mask)
        if self._use_packed(x, valid, need_weights):
            return self._forward_packed(x, valid)
        if valid is not None:
            # Zeroed (not multiplied: 0 * inf is NaN) so that padding content cannot reach anything.
            x = torch.where(valid.unsqueeze(-1), x, x.new_zeros(()))
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd]
        key_mask = None
        if valid is not None:
            # A sample without any valid token would have all keys masked: NaN in SDPA. Its outputs
            # are all padding and are zeroed below, so let it attend anywhere instead (no sync).
            key_mask = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
        weights = None
        if need_weights or _in_func_transform():
            scores = q @ k.transpose(-2, -1)
            if key_mask is None:
                key_mask = scores.new_ones((), dtype=torch.bool).expand(1, 1, 1, N)
            weights = masked_softmax(scores, key_mask, -1, self.scale)
            out = self.attn_drop(weights) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        out = out.transpose(1, 2).reshape(B, N, C)
        out = self.proj_drop(self.proj(out))
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
            if weights is not None:
                weights = torch.where(valid[:, None, :, None], weights, weights.new_zeros(()))
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
