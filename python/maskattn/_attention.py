"""Masked scaled-dot-product attention for padded batches, and the pieces the attention modules share:
rotary embeddings on padded or packed tokens, and attention over packed per-sample segments.

Routes (fastest correct first), chosen here so that callers never choose:

* packed: a key mask over a self-attention batch ``[B, H, N, D]`` on CUDA in float16 / bfloat16 with
  a head dim FlashAttention takes (a multiple of 8, at most 256): the valid tokens are packed and
  attended by ``torch.nn.attention.varlen.varlen_attn`` per sample, so padding costs nothing
  (one host sync for the packed size);
* ``F.scaled_dot_product_attention`` with a boolean mask (rows without a valid key get zeros, not
  the NaN of an all ``-inf`` row);
* materialised scores + the fused :func:`maskattn.masked_softmax` when the weights are asked for.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops.masked_softmax import masked_softmax
from ._packed_layout import PackedLayout

try:  # torch >= 2.10: FlashAttention over packed sequences (CUDA, half types)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None

_HALF = (torch.float16, torch.bfloat16)

# A rotary embedding: a callable on [B, H, N, D] (JiT's VisionRotaryEmbeddingFast), or (cos, sin).
Rope = Union[Callable[[Tensor], Tensor], Tuple[Tensor, Tensor], Sequence[Tensor]]


def varlen_supported(q: Tensor) -> bool:
    """Whether FlashAttention's varlen kernel takes ``q``: CUDA, a half type, head dim % 8 == 0, <= 256."""
    return varlen_takes(q.device, q.dtype, q.shape[-1])


def varlen_takes(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return (
        _varlen_attn is not None and device.type == "cuda" and dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256
    )


# ---------------------------------------------------------------------------------------------------
# rotary embeddings
# ---------------------------------------------------------------------------------------------------
def rotate_adjacent_pairs(t: Tensor) -> Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the rotation of EVA's and JiT's rope."""
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``t * cos + rotate_adjacent_pairs(t) * sin``, broadcasting ``cos`` / ``sin`` against ``t``.

    Computed as ``t * cos + swap(t) * sin'`` with the pairs of ``t`` swapped and the sign folded into
    the (small) table: the same products bit for bit, one copy of ``t`` instead of two, and a
    backward that is one more swap instead of zero-filled stack gradients."""
    s = sin.unflatten(-1, (-1, 2))
    signed_sin = torch.stack((-s[..., 0], s[..., 1]), dim=-1).flatten(-2)
    return t * cos + t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * signed_sin


def _rope_tables(rope) -> Optional[Tuple[Tensor, Tensor]]:
    """``(cos, sin)`` of a pair, or of a module exposing ``freqs_cos`` / ``freqs_sin`` (JiT's and EVA's
    ``VisionRotaryEmbeddingFast``, whose forward is :func:`apply_rotary` with them); else None."""
    if isinstance(rope, (tuple, list)):
        if len(rope) != 2 or not all(isinstance(r, Tensor) for r in rope):
            raise TypeError(
                f"rope: a sequence must be a (cos, sin) pair of tensors, got {[type(r).__name__ for r in rope]}"
            )
        return rope[0], rope[1]
    cos, sin = getattr(rope, "freqs_cos", None), getattr(rope, "freqs_sin", None)
    if isinstance(cos, Tensor) and isinstance(sin, Tensor):
        return cos, sin
    return None


def check_rope(rope) -> None:
    if isinstance(rope, (tuple, list)):
        _rope_tables(rope)
    elif rope is not None and not callable(rope):
        raise TypeError(
            "rope must be a callable applied to q and k of shape [B, heads, N, head_dim] or a (cos, sin) "
            f"pair of tensors, got {type(rope).__name__}"
        )


def apply_rope(t: Tensor, rope) -> Tensor:
    """Rotary embedding of ``t`` ``[B, H, N, D]`` (padded layout)."""
    if rope is None:
        return t
    if isinstance(rope, (tuple, list)):
        cos, sin = _rope_tables(rope)
        return apply_rotary(t, cos, sin)
    return rope(t)


def _table_rows(table: Tensor, layout: PackedLayout, head_dim: int) -> Optional[Tensor]:
    """The rows of a ``[N, D]`` (leading 1s allowed) or per-sample ``[B, 1, N, D]`` rope table for the
    packed tokens: ``[T, 1, D]``; None for any other shape."""
    N, B = layout.seq_len, layout.batch
    if table.dim() < 2 or table.shape[-2] != N or table.shape[-1] != head_dim:
        return None
    lead = table.shape[:-2]
    if all(s == 1 for s in lead):
        return table.reshape(N, head_dim).index_select(0, layout.positions).unsqueeze(1)
    if len(lead) == 2 and lead[0] == B and lead[1] == 1:
        return table.reshape(B * N, head_dim).index_select(0, layout.index).unsqueeze(1)
    return None


def apply_rope_packed(t: Tensor, rope, layout: PackedLayout) -> Tensor:
    """Rotary embedding of packed tokens ``t`` ``[T, H, D]`` at their original positions.

    A ``(cos, sin)`` table (or a module exposing ``freqs_cos`` / ``freqs_sin``) is indexed by each
    token's position. Any other callable sees the padded layout: the tokens are scattered into
    zeros ``[B, H, N, D]``, rotated and gathered back (correct for any position-wise embedding, at
    the price of one padded-size pass)."""
    if rope is None:
        return t
    tables = _rope_tables(rope)
    if tables is not None:
        cos, sin = (_table_rows(tab, layout, t.shape[-1]) for tab in tables)
        if cos is not None and sin is not None:
            return apply_rotary(t, cos, sin)
    padded = layout.unpack(t).transpose(1, 2)  # [B, H, N, D], zeros at padding
    return layout.pack(apply_rope(padded, rope).transpose(1, 2))


# ---------------------------------------------------------------------------------------------------
# attention cores
# ---------------------------------------------------------------------------------------------------
def _compute_dtype(q: Tensor, k: Tensor, v: Tensor, fp32: bool) -> torch.dtype:
    """What the attention runs in: float32 (at least) with ``fp32``; under autocast its dtype, as
    SDPA under autocast would (float64 excepted); otherwise the promoted dtype of q, k and v (a rope
    table in float32 applied to bfloat16 q and k promotes them)."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if fp32:
        return torch.float32 if dt in _HALF else dt
    if dt != torch.float64 and torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return dt


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``x``'s matmuls run in: autocast's when it is on (float64 excepted), else its own."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float, dropout_p: float, fp32: bool):
    """SDPA in :func:`_compute_dtype`; with ``fp32`` with autocast off and the output cast back to
    ``v``'s dtype. Mixed dtypes outside autocast: the output takes ``v``'s dtype."""
    dt = _compute_dtype(q, k, v, fp32)
    q, k, v_in = q.to(dt), k.to(dt), v.to(dt)
    if fp32:
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v_in, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        return out.to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v_in, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out if torch.is_autocast_enabled(q.device.type) else out.to(v.dtype)


def _weights_attention(q, k, v, mask: Optional[Tensor], scale: float, dropout_p: float, fp32: bool):
    """Materialised scores + the fused masked softmax; returns ``(out, weights)``."""
    if fp32:
        out_dtype = v.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = (t.float() if t.dtype in _HALF else t for t in (q, k, v))
            scores = q @ k.to(q.dtype).transpose(-2, -1)
            weights = masked_softmax(scores, _all_valid(scores) if mask is None else mask, -1, scale)
            w = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
            out = w @ v.to(w.dtype)
        return out.to(out_dtype), weights
    dt = torch.promote_types(q.dtype, k.dtype)
    scores = q.to(dt) @ k.to(dt).transpose(-2, -1)
    weights = masked_softmax(scores, _all_valid(scores) if mask is None else mask, -1, scale)
    w = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return w.to(v.dtype) @ v, weights


def _all_valid(scores: Tensor) -> Tensor:
    return scores.new_ones((), dtype=torch.bool).expand(*([1] * scores.dim()))


def attend_packed(
    q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, scale: float, dropout_p: float = 0.0, fp32: bool = False
) -> Tensor:
    """Attention within each sample of packed tokens ``q``, ``k``, ``v`` ``[T, H, D]`` -> ``[T, H, Dv]``.

    CUDA half types (head dim FlashAttention takes, no dropout): FlashAttention's varlen kernel.
    Other CUDA cases: one batched SDPA over a padded copy with a key mask (a loop over the samples
    would launch B kernels). CPU: SDPA per sample, so each costs its own length squared."""
    if layout.total == 0:
        return v.new_zeros(v.shape)
    dt = _compute_dtype(q, k, v, fp32)
    if not fp32 and dropout_p == 0.0 and varlen_takes(q.device, dt, q.shape[-1]) and not torch.compiler.is_compiling():
        cu = layout.cu_seqlens
        q, k, v_in = (t.to(dt).contiguous() for t in (q, k, v))
        out = _varlen_attn(q, k, v_in, cu, cu, layout.max_len, layout.max_len, scale=scale)
        return out if torch.is_autocast_enabled(q.device.type) else out.to(v.dtype)
    if q.is_cuda:
        qp, kp, vp = (layout.unpack(t).transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        valid = layout.valid
        key_mask = (valid | ~valid.any(1, keepdim=True))[:, None, None, :]
        out = _sdpa(qp, kp, vp, key_mask, scale, dropout_p, fp32)
        return layout.pack(out.transpose(1, 2))
    # split, not slices: the backward then writes each gradient once, where slices would each
    # zero-fill and add a whole [T, H, D] gradient per sample
    outs = []
    for qs, ks, vs in zip(*(t.split(layout.lengths) for t in (q, k, v))):
        if qs.shape[0]:
            # [1, H, n, D]: the 4-D form takes the CPU flash kernel (3-D inputs go to the math path)
            seg = [t.unsqueeze(0).transpose(1, 2) for t in (qs, ks, vs)]
            outs.append(_sdpa(*seg, None, scale, dropout_p, fp32)[0].transpose(0, 1))
    return torch.cat(outs, 0)


# ---------------------------------------------------------------------------------------------------
# the functional API
# ---------------------------------------------------------------------------------------------------
def _normalise_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """Any dtype, nonzero = valid -> bool, broadcastable to the scores ``[*batch, Lq, Lk]``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"masked_attention: mask must be a Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"masked_attention: mask must be a real or bool tensor (nonzero = valid), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"masked_attention: mask ({mask.device}) and q ({q.device}) must be on the same device")
    valid = mask if mask.dtype == torch.bool else mask != 0
    Lk = k.shape[-2]
    scores_shape = (*q.shape[:-1], Lk)
    if valid.dim() == 2 and q.dim() >= 3 and valid.shape == (q.shape[0], Lk):
        # the padded-batch key mask [B, Lk] (read so even when B == Lq: [Lq, Lk] must then be 4-D)
        return valid.reshape(q.shape[0], *([1] * (q.dim() - 2)), Lk)
    try:
        ok = valid.dim() <= len(scores_shape) and torch.broadcast_shapes(valid.shape, scores_shape) == scores_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"masked_attention: mask of shape {tuple(mask.shape)} does not broadcast to the scores "
            f"{list(scores_shape)} of q {tuple(q.shape)} and k {tuple(k.shape)}; pass a key mask [B, Lk], "
            f"[B, 1, 1, Lk] or a per-pair mask [B, H or 1, Lq, Lk] or [Lq, Lk]"
        )
    return valid


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"masked_attention: {name} must be [..., L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"masked_attention: {name} must be a floating tensor, got {t.dtype}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            "masked_attention: q [..., Lq, D], k [..., Lk, D] and v [..., Lk, Dv] must share their batch "
            f"dims, D and Lk; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"masked_attention: q ({q.device}), k ({k.device}) and v ({v.device}) must be on one device")


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    zero_padded_queries: bool = True,
    *,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    fp32_attention: bool = False,
    pack: Optional[bool] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled dot-product attention over a padded batch, never NaN: ``softmax(q k^T * scale) v``
    among the valid keys.

    Args:
        q, k, v: ``[..., Lq, D]``, ``[..., Lk, D]``, ``[..., Lk, Dv]`` (usually ``[B, H, L, D]``).
        mask: nonzero = valid, any real dtype: a key mask ``[B, Lk]`` (padded batches; broadcast over
            heads and queries), ``[B, 1, 1, Lk]``, or a per-pair mask broadcastable to
            ``[..., Lq, Lk]`` (e.g. ``[B, H, Lq, Lk]`` or ``[Lq, Lk]``; a 2-D mask of shape
            ``[B, Lk]`` is read as the key mask, so when ``B == Lq`` give a per-pair one 4-D).
            None: plain attention.
        scale: defaults to ``D ** -0.5``.
        zero_padded_queries: with a key mask and ``Lq == Lk`` (self-attention), the rows of the
            output at padding positions are exactly 0 (otherwise they attend to the valid keys, as
            SDPA with a key mask gives). A row with no valid key is 0 whatever this says.
        dropout_p: attention dropout (apply it only in training).
        need_weights: also return the weights ``[..., Lq, Lk]`` (materialised; computed by the fused
            :func:`maskattn.masked_softmax`).
        fp32_attention: logits, softmax and weighted sum in float32 with autocast off (JiT computes
            its logits this way); the output keeps ``v``'s dtype.
        pack: the packed route (see below): None = where it is fastest (CUDA half types, eager),
            False = never (no host sync: CUDA graphs), True = whenever the mask allows it.

    With a key mask the padding entries of ``k`` and ``v`` (and of ``q`` at padded queries when
    they are zeroed) are replaced by zeros before use, so whatever they hold (inf, NaN) reaches no
    output and no gradient, and gradients at padding are exactly 0. A per-pair mask cannot say
    which entries are padding: there, padding content must be finite.

    Routes: a key mask in self-attention shape ``[B, H, N, D]`` on CUDA in float16 / bfloat16 (head
    dim a multiple of 8, at most 256; no dropout, no weights, ``zero_padded_queries``) packs the
    valid tokens and runs FlashAttention's varlen kernel, so padding costs no compute (one host
    sync). Otherwise ``F.scaled_dot_product_attention`` with a boolean mask, or, with
    ``need_weights``, scores + ``masked_softmax``.
    """
    _check_qkv(q, k, v)
    D, Lq, Lk = q.shape[-1], q.shape[-2], k.shape[-2]
    if scale is None:
        scale = D**-0.5
    if mask is None:
        if need_weights:
            return _weights_attention(q, k, v, None, scale, dropout_p, fp32_attention)
        return _sdpa(q, k, v, None, scale, dropout_p, fp32_attention)
    m = _normalise_mask(mask, q, k)
    key_mask = m.dim() >= 2 and m.shape[-2] == 1
    query_valid = None
    if key_mask:
        kv_valid = m.transpose(-2, -1)  # [..., Lk, 1]
        if zero_padded_queries and Lq == Lk:
            if _use_packed_route(q, k, v, m, pack, need_weights, dropout_p, fp32_attention):
                return _masked_attention_packed(q, k, v, m, scale, dropout_p, fp32_attention)
            query_valid = kv_valid
            q = torch.where(query_valid, q, q.new_zeros(()))
        k = torch.where(kv_valid, k, k.new_zeros(()))
        v = torch.where(kv_valid, v, v.new_zeros(()))
    if need_weights:
        out, weights = _weights_attention(q, k, v, m, scale, dropout_p, fp32_attention)
        if query_valid is not None:
            out = torch.where(query_valid, out, out.new_zeros(()))
            weights = torch.where(query_valid, weights, weights.new_zeros(()))
        return out, weights
    # A row whose keys are all masked would be NaN in SDPA: let it attend anywhere, then zero it.
    dead = ~m.any(-1, keepdim=True)
    out = _sdpa(q, k, v, m | dead, scale, dropout_p, fp32_attention)
    keep = ~dead if query_valid is None else query_valid & ~dead
    return torch.where(keep, out, out.new_zeros(()))


def _use_packed_route(q, k, v, m, pack, need_weights, dropout_p, fp32) -> bool:
    if pack is False or need_weights or q.dim() != 4 or m.dim() != 4 or m.shape[1] != 1:
        return False
    if pack is None:
        return (
            dropout_p == 0.0
            and not fp32
            and varlen_takes(q.device, _compute_dtype(q, k, v, False), q.shape[-1])
            and not torch.compiler.is_compiling()
        )
    return True


def _masked_attention_packed(q, k, v, m, scale, dropout_p, fp32) -> Tensor:
    B, H, N, _ = q.shape
    layout = PackedLayout(m.reshape(m.shape[0], N).expand(B, N))
    qt, kt, vt = (layout.pack(t.transpose(1, 2)) for t in (q, k, v))  # [T, H, D]
    out = attend_packed(qt, kt, vt, layout, scale, dropout_p, fp32)
    return layout.unpack(out).transpose(1, 2)
