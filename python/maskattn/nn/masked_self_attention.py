"""Multi-head self-attention over padded token sequences (padded images as patches, padded text)."""

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _tracing
from .. import _validation as _v
from .._attention import (
    Rope,
    _sdpa,
    _weights_attention,
    apply_rope,
    apply_rope_packed,
    attend_packed,
    autocast_dtype,
    check_rope,
    varlen_takes,
)
from .._packed_layout import PackedLayout, active_layout, active_mask

_NAME = "MaskedSelfAttention"


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


class RMSNorm(nn.Module):
    """JiT's RMSNorm (``q_norm`` / ``k_norm`` with ``qk_norm=True``): ``x / sqrt(mean(x^2) + eps)``
    in float32 (float64 input: in float64), times ``weight`` (init 1), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x if x.dtype == torch.float64 else x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _qk_norm_layer(norm_layer, head_dim: int, eps: Optional[float]) -> nn.Module:
    if isinstance(norm_layer, str):
        kind = norm_layer.lower()
        if kind == "rmsnorm":
            return RMSNorm(head_dim, eps=1e-6 if eps is None else eps)
        if kind == "layernorm":
            return nn.LayerNorm(head_dim, eps=1e-6 if eps is None else eps)
        raise ValueError(
            f"MaskedSelfAttention: norm_layer must be 'rmsnorm', 'layernorm' or a callable head_dim -> "
            f"module, got {norm_layer!r}"
        )
    if not callable(norm_layer):
        raise TypeError(
            f"MaskedSelfAttention: norm_layer must be 'rmsnorm', 'layernorm' or a callable head_dim -> module, "
            f"got {type(norm_layer).__name__}"
        )
    if eps is not None:
        raise ValueError("MaskedSelfAttention: norm_eps applies to norm_layer='rmsnorm' / 'layernorm' only")
    return norm_layer(head_dim)


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
    """Multi-head self-attention that ignores padding tokens: JiT's and timm's ``Attention``, with a mask.

    ``forward(x [B, N, dim], mask=None, key_padding_mask=None, need_weights=False, rope=None)``:

    * ``mask`` is a valid mask ``[B, N]`` (nonzero = token takes part, e.g. ``patch_mask`` with
      :func:`prepend_condition_mask` for condition tokens); ``key_padding_mask`` is PyTorch's
      convention (True = padding). Pass at most one. Inside :class:`maskattn.nn.PackedBlocks` the
      mask given to the block stack applies when the block passes none (JiT's block passes none).
    * ``rope``: rotary embedding applied to q and k after the qk-norm, as JiT's block calls its
      attention (``attn(x, rope=feat_rope)``): a callable on ``[B, heads, N, head_dim]`` (JiT's
      ``VisionRotaryEmbeddingFast``), or a ``(cos, sin)`` pair broadcastable to it, applied as
      ``t * cos + rot(t) * sin`` with JiT's / EVA's rotation of adjacent channel pairs.
    * Keys at padding get weight exactly 0; outputs at padding are exactly 0; nothing is NaN, even
      for a sample with no valid token (the ``masked_fill(-inf)`` + softmax of the hand-written
      layer gives NaN there). Padding inputs are zeroed before the projection, so results for valid
      tokens depend neither on what the padding holds (even inf/NaN) nor on how much of it there is.
    * Gradients reaching padding tokens are exactly 0.

    Constructor: ``dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0`` as JiT and timm
    name them, and keyword-only:

    * ``qk_norm=False``: normalise q and k per head (submodules ``q_norm`` / ``k_norm``) with
      ``norm_layer``: ``"rmsnorm"`` (JiT's RMSNorm with a weight, eps 1e-6), ``"layernorm"``
      (``nn.LayerNorm``, eps 1e-6 as timm's ViT builds it) or a callable ``head_dim -> module``
      (timm's ``norm_layer=nn.LayerNorm``); ``norm_eps`` overrides the eps of the named ones.
    * ``proj_bias=True`` (timm's).
    * ``fp32_attention=False``: logits, softmax and weighted sum in float32 with autocast off,
      the output cast back: JiT computes its logits this way (its weighted sum then runs in the
      autocast dtype; here it stays in float32). Only matters for half types / autocast.

    Parameter names are those of JiT's and timm's ``Attention`` (``qkv``: Linear(dim, 3 dim),
    ``q_norm`` / ``k_norm``, ``proj``: Linear(dim, dim)), so their state dicts load with
    ``strict=True`` into the module built with the same options.

    Routing, fastest correct path first:

    1. CUDA, float16/bfloat16, a head dim that is a multiple of 8 and at most 256 (FlashAttention's
       limits), eager, no ``need_weights``, no ``fp32_attention``, no active attention dropout, a
       mask given: the valid tokens are *packed* (padding dropped), projected, and attended with
       ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over variable-length sequences),
       then scattered back with zeros at padding. Compute and memory scale with the number of valid
       tokens, so a batch with 30% padding is faster than one with none. Learning the packed size
       costs one host sync per call; set ``module.pack_padding = False`` to avoid it (CUDA graphs),
       or ``True`` to force packing in eager mode (where FlashAttention does not apply - CPU,
       float32, other head dims - the packed sequences then run SDPA one by one). Under
       ``torch.compile`` path 2 always runs: packing needs the host sync. To pack once for a whole
       block stack (projections and MLP on valid tokens only too), use
       :class:`maskattn.nn.PackedBlocks`.
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

    Half types use float32 accumulation on every path; head dims 64, 80 and 128 are tested in bf16.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        qk_norm: bool = False,
        norm_layer: Union[str, Callable[[int], nn.Module]] = "rmsnorm",
        norm_eps: Optional[float] = None,
        proj_bias: bool = True,
        fp32_attention: bool = False,
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
        self.fp32_attention = bool(fp32_attention)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if qk_norm:
            self.q_norm = _qk_norm_layer(norm_layer, self.head_dim, norm_eps)
            self.k_norm = _qk_norm_layer(norm_layer, self.head_dim, norm_eps)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
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
            or _tracing.in_func_transform()
        ):
            return False
        if self.pack_padding is not None:
            return bool(self.pack_padding)
        return (
            not self.fp32_attention
            and varlen_takes(x.device, autocast_dtype(x), self.head_dim)
            and not torch.compiler.is_compiling()
        )

    def _qkv_heads(self, x: Tensor, rope, layout: Optional[PackedLayout] = None):
        """q, k, v with qk-norm and rope: ``[B, H, N, hd]`` from ``[B, N, C]``, or ``[T, H, hd]`` from
        packed tokens ``[T, C]`` (``layout`` given)."""
        H, hd = self.num_heads, self.head_dim
        if layout is None:
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).reshape(x.shape[0], 3, H, hd).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if layout is None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            else:
                q, k = apply_rope_packed(q, rope, layout), apply_rope_packed(k, rope, layout)
        return q, k, v

    def _forward_tokens(self, t: Tensor, layout: PackedLayout, rope=None) -> Tensor:
        """Packed tokens ``[T, C]`` of ``layout`` -> ``[T, C]``, attending within each sample."""
        q, k, v = self._qkv_heads(t, rope, layout)
        dropout_p = self.attn_drop.p if self.training else 0.0
        o = attend_packed(q, k, v, layout, self.scale, dropout_p, self.fp32_attention)
        return self.proj_drop(self.proj(o.reshape(t.shape[0], self.dim)))

    def _forward_packed(self, x: Tensor, valid: Tensor, rope=None) -> Tensor:
        layout = PackedLayout(valid)  # the one host sync: T and the longest sequence size the kernels
        return layout.unpack(self._forward_tokens(layout.pack(x), layout, rope))

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        rope: Optional[Rope] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        _v.check_floating(x, _NAME, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MaskedSelfAttention: x must be [B, N, {self.dim}], got shape {tuple(x.shape)}")
        if mask is not None and not isinstance(mask, Tensor) and (callable(mask) or isinstance(mask, (tuple, list))):
            raise TypeError(
                f"MaskedSelfAttention: mask must be a Tensor, got {type(mask).__name__}; the second positional "
                "argument is the mask here, so pass a rotary embedding by keyword: attn(x, rope=rope)"
            )
        check_rope(rope)
        B, N, C = x.shape
        layout = active_layout(x)
        if layout is not None:
            return self._forward_in_packed_blocks(x, layout, mask, key_padding_mask, need_weights, rope)
        valid = _valid_mask(x, mask, key_padding_mask)
        if valid is None:
            valid = active_mask(x)
        if self._use_packed(x, valid, need_weights):
            return self._forward_packed(x, valid, rope)
        if valid is not None:
            # Zeroed (not multiplied: 0 * inf is NaN) so that padding content cannot reach anything.
            x = torch.where(valid.unsqueeze(-1), x, x.new_zeros(()))
        q, k, v = self._qkv_heads(x, rope)  # [B, H, N, hd]
        key_mask = None
        if valid is not None:
            # A sample without any valid token would have all keys masked: NaN in SDPA. Its outputs
            # are all padding and are zeroed below, so let it attend anywhere instead (no sync).
            key_mask = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
        dropout_p = self.attn_drop.p if self.training else 0.0
        weights = None
        if need_weights or _tracing.in_func_transform():
            out, weights = _weights_attention(q, k, v, key_mask, self.scale, dropout_p, self.fp32_attention)
        else:
            out = _sdpa(q, k, v, key_mask, self.scale, dropout_p, self.fp32_attention)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = self.proj_drop(self.proj(out))
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
            if weights is not None:
                weights = torch.where(valid[:, None, :, None], weights, weights.new_zeros(()))
        return (out, weights) if need_weights else out

    def _forward_in_packed_blocks(self, x, layout, mask, key_padding_mask, need_weights, rope) -> Tensor:
        # PackedBlocks runs the block on the valid tokens [T, 1, C]; a mask the block passes along
        # was packed with them ([T, 1], every entry valid): the stack's mask already applies.
        for name, m in (("mask", mask), ("key_padding_mask", key_padding_mask)):
            if m is not None and tuple(m.shape) != (layout.total, 1):
                raise ValueError(
                    f"MaskedSelfAttention: inside PackedBlocks' packed route x is the packed tokens "
                    f"{tuple(x.shape)} and the stack's mask applies; {name} must be None or the packed "
                    f"[{layout.total}, 1] one, got shape {tuple(m.shape)}"
                )
        if need_weights:
            raise ValueError(
                "MaskedSelfAttention: need_weights=True is not available inside PackedBlocks' packed route "
                "(the weights of packed samples have no [B, H, N, N] layout); use PackedBlocks(pack=False)"
            )
        T, _, C = x.shape
        return self._forward_tokens(x.reshape(T, C), layout, rope).view(T, 1, C)

    def extra_repr(self) -> str:
        extra = ", qk_norm=True" if not isinstance(self.q_norm, nn.Identity) else ""
        extra += ", fp32_attention=True" if self.fp32_attention else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{extra}"
