from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _segments
from .. import _validation as _v
from .._chunked import chunked_attention_pool
from .._ops.gated_attention_scores import gated_attention_scores
from .._ops.masked_attention_pool import masked_attention_pool, masked_attention_pool_packed

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


# Rows scored per block on CPU: the scoring MLP's [rows, hidden] intermediates stay a few MB, which
# the allocator reuses from step to step, where [T, hidden] for a whole batch is fresh memory (page
# faults) every step; measured 11 % faster fwd+bwd at T = 63k, D = 1024, hidden 256 on 2 cores.
_BLOCK_ROWS = 8192


def _capturing_cuda_graph(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _blocked(x: Tensor) -> bool:
    # CUDA: one large GEMM is faster and there is no first-touch cost; compiled: inductor plans memory.
    return not x.is_cuda and not torch.compiler.is_compiling()


def _has_hooks(m: nn.Module) -> bool:
    g = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks)


_NAME = "AttentionPooling"


class AttentionPooling(nn.Module):
    """Attention-based MIL pooling (Ilse et al., 2018) over padded, packed or single bags, fused.

    A drop-in for the hand-written ``AttentionAggregator`` and for the attention pools of CLAM,
    torchmil and PyG: an MLP scores every instance, a softmax over each bag's *valid* instances turns
    the scores into weights, and the bag is their weighted sum. Unlike ``masked_fill(mask == 0,
    -1e9)``, padding gets weight exactly 0 and a bag with no valid instance pools to zeros instead of
    averaging its padding.

    Args:
        in_dim: feature size D.
        hidden_dim: hidden size of the scoring MLP; ``None`` scores with one linear layer
            ``Linear(D, K)`` (PyG's ``gate_nn = Linear(F, 1)``; not with ``gated``).
        gated: the gated variant (CLAM's ``Attn_Net_Gated``), ``w^T (act(V h) * sigmoid(U h))``;
            everything after the two input GEMMs (their biases included) runs as one op,
            :func:`maskattn.gated_attention_scores` (no activation stored), except while dropout
            is active in training; input layers that carry forward hooks are called as modules.
        branches: K attention branches (multi-branch / multi-class MIL, CLAM_MB); outputs gain a K dim.
        dropout: dropout after the activation of each branch, before the product (CLAM's placement;
            CLAM uses 0.25).
        act: the activation of the (first) hidden branch: ``"tanh"`` (ABMIL, CLAM), ``"relu"`` or
            ``"gelu"`` (torchmil's options).
        bias_last: bias on the last linear layer (torchmil's ``fc2`` has none).
        chunk_size: pool with :func:`maskattn.chunked_attention_pool` (the scoring network on
            ``chunk_size`` rows at a time under activation checkpointing, chunks merged exactly by
            log-sum-exp) for huge bags; ``None`` (default) pools in one pass. ``forward`` takes the
            same argument for one call. Result and gradients equal the unchunked ones to rounding;
            padded rows are scored there (read in place chunk by chunk) but weigh 0 and report 0.

    Parameters, so that the usual checkpoints load unchanged:

    - plain: ``attention_net = Sequential(Linear(D, hidden), act, [Dropout], Linear(hidden, K))``:
      ``attention_net.0`` and ``attention_net.2`` (``attention_net.3`` with dropout), the names of
      the ``Sequential(Linear, Tanh, Linear)`` aggregator; ``hidden_dim=None``: ``attention_net.0``.
    - gated: ``attention_v = Sequential(Linear, act, [Dropout])``, ``attention_u = Sequential(Linear,
      Sigmoid, [Dropout])``, ``attention_w = Linear(hidden, K)``.

    CLAM / torchmil / PyG parameters load with :meth:`from_clam`, :meth:`from_torchmil` and
    :meth:`from_pyg` (``maskattn.nn.convert``).

    ``forward(features, mask=None, return_scores=False, *, offsets=None, batch=None, num_bags=None)``
    takes three layouts (K = ``branches``; the K dim is absent when ``branches == 1``):

    ==========================  =========================  ===================  ==================
    input                        layout                     pooled               weights, scores
    ==========================  =========================  ===================  ==================
    ``[B, N, D]`` + ``mask``      padded batch               ``[B, (K,) D]``       ``[B, N, (K)]``
    ``[T, D]`` + ``offsets``      packed (bags back to back)  ``[B, (K,) D]``       ``[T, (K)]``
    ``[T, D]`` + ``batch``        packed, PyG's bag ids       ``[B, (K,) D]``       ``[T, (K)]``
    ``[N, D]`` (+ ``mask [N]``)   one bag (CLAM's input)      ``[(K,) D]``          ``[N, (K)]``
    ==========================  =========================  ===================  ==================

    ``mask`` is a valid mask of any dtype (nonzero = instance, 0 = padding) or None (all valid).
    ``offsets`` int64 ``[B+1]`` and ``batch`` / ``num_bags`` are as in
    :func:`maskattn.masked_attention_pool_packed`, except that ``batch`` may be unsorted, as PyG's
    scatter softmax takes it: interleaved ids are stably sorted (one ``[T, D]`` gather) and weights
    and scores come back in the caller's row order. Checking costs one host sync on CUDA (shared
    with reading ``num_bags``); where no sync is allowed the ids are always sorted. For a single bag CLAM writes ``A`` ``[K, N]`` and
    ``M = A @ h`` ``[K, D]``: ``weights.view(N, -1).T`` is CLAM's ``A``, ``pooled`` (``[K, D]``
    when ``K > 1``) its ``M``. ``return_scores=True`` adds the pre-softmax scores (heatmaps, top-k
    instance selection with :func:`maskattn.topk_per_bag`); they are computed anyway. Scores at
    padding are 0 (they are never computed).

    **Only valid instances are scored.** A padded batch with padding has its valid rows gathered
    (one pass over them), scored, and the scores scattered back to ``[B, N]`` for the fused padded
    op, which reads the valid rows of ``features`` in place: the MLP never runs on padding (and so
    never sees what padding holds, even inf / NaN), and no pass rewrites the whole ``[B, N, D]``
    tensor. Learning the number of valid rows is free on CPU and costs one host sync on CUDA.
    Where a sync is not allowed the module takes a sync-free path instead: under
    ``torch.compile`` (so ``fullgraph=True`` and ``dynamic=True`` hold), inside ``torch.func``
    transforms (``vmap``, ``jacrev``, ...), while a CUDA graph is being captured, or when the
    attribute ``pack_padding`` is ``False``; that path zeroes the padding rows
    (one pass over ``[B, N, D]``) and scores all ``B * N`` rows. ``pack_padding = True`` forces the
    gather, ``None`` (default) chooses as above. A mask with no padding skips both. On CPU (eager)
    rows are gathered and scored in blocks of 8,192, which keeps the MLP's intermediates small.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: Optional[int] = 128,
        gated: bool = False,
        branches: int = 1,
        dropout: float = 0.0,
        act: str = "tanh",
        bias_last: bool = True,
        chunk_size: Optional[int] = None,
    ):
        super().__init__()
        in_dim = _v.as_int(in_dim, _NAME, "in_dim", min_value=1)
        if hidden_dim is not None:
            hidden_dim = _v.as_int(hidden_dim, _NAME, "hidden_dim", min_value=1)
        branches = _v.as_int(branches, _NAME, "branches", min_value=1)
        gated = _v.as_bool(gated, _NAME, "gated")
        bias_last = _v.as_bool(bias_last, _NAME, "bias_last")
        dropout = _v.as_probability(dropout, _NAME, "dropout")
        if act not in _ACTIVATIONS:
            raise ValueError(f"AttentionPooling: act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if hidden_dim is None and (gated or dropout > 0):
            raise ValueError(
                "AttentionPooling: hidden_dim=None (a linear scorer) has no hidden layer for gated=True or dropout"
            )
        self.in_dim, self.hidden_dim, self.gated, self.branches = in_dim, hidden_dim, gated, branches
        self.act, self.bias_last, self.dropout = act, bias_last, dropout
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        if gated:
            self.attention_v = nn.Sequential(nn.Linear(in_dim, hidden_dim), _ACTIVATIONS[act](), *drop)
            self.attention_u = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), *[nn.Dropout(dropout) for _ in drop]
            )
            self.attention_w = nn.Linear(hidden_dim, branches, bias=bias_last)
        elif hidden_dim is None:
            self.attention_net = nn.Sequential(nn.Linear(in_dim, branches, bias=bias_last))
        else:
            self.attention_net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                _ACTIVATIONS[act](),
                *drop,
                nn.Linear(hidden_dim, branches, bias=bias_last),
            )
        self.chunk_size = self._check_chunk_size(chunk_size)
        # None = gather the valid rows of a padded batch wherever that needs no forbidden host sync
        # (see the class docstring); a plain attribute, like MaskedSelfAttention's.
        self.pack_padding: Optional[bool] = None

    # ------------------------------------------------------------------ scoring

    def _score_rows(self, x: Tensor) -> Tensor:
        """Scores of feature rows ``[..., D]`` -> ``[..., K]`` (the K dim kept)."""
        if self.gated:
            if self.dropout > 0 and self.training:
                return self.attention_w(self.attention_v(x) * self.attention_u(x))
            # the input layers' biases, the two activations, their product and the last layer in one
            # op, forward and backward; the input layers are plain GEMMs
            lv, lu, w = self.attention_v[0], self.attention_u[0], self.attention_w
            if _has_hooks(lv) or _has_hooks(lu):  # hooks see the layers called as modules
                return gated_attention_scores(lv(x), lu(x), w.weight, w.bias, self.act)
            v, u = F.linear(x, lv.weight), F.linear(x, lu.weight)
            return gated_attention_scores(v, u, w.weight, w.bias, self.act, lv.bias, lu.bias)
        return self.attention_net(x)

    def _score_packed(self, x: Tensor) -> Tensor:
        """Scores of rows ``[M, D]`` -> ``[M, K]``, in blocks of rows where that pays (CPU, eager)."""
        if x.shape[0] > _BLOCK_ROWS and _blocked(x):
            return torch.cat([self._score_rows(b) for b in x.split(_BLOCK_ROWS)])
        return self._score_rows(x)

    def scores(self, features: Tensor) -> Tensor:
        """Pre-softmax attention scores of every row: ``[..., D]`` -> ``[...]`` (or ``[..., K]``)."""
        s = self._score_rows(features)
        return s.squeeze(-1) if self.branches == 1 else s

    def _squeeze(self, t: Tensor) -> Tensor:
        return t.squeeze(-1) if self.branches == 1 else t

    # ------------------------------------------------------------------ layouts

    def _check_features(self, features: Tensor, packed: bool) -> None:
        _v.check_floating(features, _NAME, "features")
        d = self.in_dim
        ok = isinstance(features, Tensor) and features.shape[-1:] == (d,)
        ok = ok and (features.dim() == 2 if packed else features.dim() in (2, 3))
        if not ok:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            if packed:
                raise ValueError(
                    f"AttentionPooling: packed features (with offsets/batch) must be [T, {d}], got shape {shape}"
                )
            raise ValueError(
                f"AttentionPooling: features must be [B, N, {d}] (padded, with mask), [T, {d}] (packed, with "
                f"offsets or batch) or [N, {d}] (one bag), got shape {shape}"
            )

    @staticmethod
    def _check_chunk_size(chunk_size) -> Optional[int]:
        return None if chunk_size is None else _v.as_int(chunk_size, _NAME, "chunk_size", min_value=1)

    @staticmethod
    def _may_sync(features: Tensor) -> bool:
        """Whether data-dependent shapes and host reads are allowed here: not under torch.compile,
        not while a CUDA graph is captured, not inside torch.func transforms (vmap cannot batch
        nonzero's data-dependent shape)."""
        return (
            not torch.compiler.is_compiling()
            and not _capturing_cuda_graph(features)
            and not torch._C._are_functorch_transforms_active()
        )

    def _use_packing(self, features: Tensor) -> bool:
        if self.pack_padding is not None:
            return bool(self.pack_padding)
        return self._may_sync(features)

    def _bag_order(self, features: Tensor, batch: Tensor, num_bags: Optional[int]):
        """Offsets of PyG-style bag ids, and the stable permutation that makes the rows bag by bag
        (``perm``, ``inverse``; both None when the ids are sorted already)."""
        _segments._check_batch(_NAME, batch)
        _segments._check_num_bags(_NAME, num_bags)
        total = features.shape[0]
        if batch.shape[0] != total:
            raise ValueError(
                f"AttentionPooling: batch must hold one bag id per row of features [T, D] = "
                f"{tuple(features.shape)}, got shape {tuple(batch.shape)}"
            )
        _v.check_same_device(features, "features", batch, "batch", _NAME)
        may_sync = self._may_sync(features)
        if may_sync and total > 0:
            # Sortedness and the number of bags in one read-back (one host sync on CUDA).
            unsorted = (batch[1:] < batch[:-1]).any().to(torch.int64)
            if num_bags is None:
                top, unsorted = torch.stack([batch.max().to(torch.int64), unsorted]).tolist()
                num_bags = top + 1
            else:
                unsorted = unsorted.item()
        else:
            # Sync-free: always the stable sort, which is the identity on sorted ids.
            unsorted = True
            if num_bags is None:
                num_bags = _segments._infer_num_bags(batch)
        if may_sync and not batch.is_cuda:
            _segments._check_range(_NAME, batch, num_bags)
        if not unsorted:
            return _segments.offsets_from_batch(batch, num_bags, check=False), None, None
        # Stable, so that the rows of a bag keep their order (PyG's scatter softmax sees them so).
        sorted_batch, perm = torch.sort(batch, stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(total, device=perm.device, dtype=perm.dtype)
        return _segments.offsets_from_batch(sorted_batch, num_bags, check=False), perm, inverse

    def _pool_packed(self, features: Tensor, offsets, batch, num_bags, chunk_size):
        if batch is None:  # batch= is sorted here (the module takes unsorted ids too)
            offsets = _segments.packed_offsets("AttentionPooling", offsets, None, num_bags)
        elif offsets is not None:
            raise ValueError("AttentionPooling: pass offsets or batch, not both")
        perm = inverse = None
        if batch is not None:
            offsets, perm, inverse = self._bag_order(features, batch, num_bags)
            if perm is not None:
                features = features.index_select(0, perm)
        if chunk_size is not None:
            pooled, weights, s = chunked_attention_pool(
                self.scores, features, chunk_size, offsets=offsets, return_scores=True
            )
        else:
            s = self._squeeze(self._score_packed(features))
            pooled, weights = masked_attention_pool_packed(s, features, offsets)
        if perm is not None:
            weights, s = weights.index_select(0, inverse), s.index_select(0, inverse)
        return pooled, weights, s

    def _pool_chunked(self, features: Tensor, mask: Optional[Tensor], chunk_size: int):
        pooled, weights, s = chunked_attention_pool(self.scores, features, chunk_size, mask=mask, return_scores=True)
        if mask is not None:
            # The chunks score padded rows too (features are read in place, chunk by chunk); their
            # weight is 0 and their scores are reported as 0, as on the unchunked route.
            valid = _v.valid_mask(mask, _NAME)
            s = torch.where(valid.unsqueeze(-1) if s.dim() > valid.dim() else valid, s, s.new_zeros(()))
        return pooled, weights, s

    def _pool_padded(self, features: Tensor, mask: Optional[Tensor]):
        B, N, D = features.shape
        # A mask the op would reject is passed on as it is: the op's error names it.
        usable = (
            mask is not None
            and mask.shape == features.shape[:2]
            and mask.device == features.device
            and not mask.dtype.is_complex
        )
        s = None
        if usable and self._use_packing(features):
            s = self._score_valid_rows(features, mask)  # None: no padding, score every row below
        elif usable:
            # Sync-free: padding rows are zeroed (not multiplied: 0 * inf is NaN) so that whatever they
            # hold reaches neither the MLP's outputs nor its parameter gradients.
            valid = mask if mask.dtype == torch.bool else mask != 0
            x = torch.where(valid.unsqueeze(-1), features, features.new_zeros(()))
            s = self._score_rows(x)
            s = torch.where(valid.unsqueeze(-1), s, s.new_zeros(()))
        if s is None:
            if features.is_contiguous():
                s = self._score_packed(features.view(B * N, D)).view(B, N, self.branches)
            else:
                s = self._score_rows(features)
        s = self._squeeze(s)
        pooled, weights = masked_attention_pool(s, features, mask)
        return pooled, weights, s

    def _score_valid_rows(self, features: Tensor, mask: Tensor) -> Optional[Tensor]:
        """Scores ``[B, N, K]`` of the valid rows, 0 at padding, computed on the valid rows only;
        None when the mask has no padding (the caller then scores every row)."""
        B, N, D = features.shape
        valid = mask if mask.dtype == torch.bool else mask != 0
        rows = valid.reshape(-1).nonzero().squeeze(1)  # row-major, bag by bag; one host sync on CUDA
        if rows.shape[0] == B * N:
            return None
        flat = features.view(B * N, D) if features.is_contiguous() else None

        def gather(r: Tensor) -> Tensor:
            if flat is not None:
                return flat.index_select(0, r)
            return features[r // N, r % N]  # any strides, read in place (a reshape would copy [B, N, D])

        if features.requires_grad or not _blocked(features):
            # one gather, so that the features' gradient is scattered back once
            s = self._score_packed(gather(rows))
        else:
            # frozen features: gather and score block by block (small allocations, reused by the
            # allocator, where one [T, D] copy is fresh memory every step)
            s = torch.cat([self._score_rows(gather(r)) for r in rows.split(_BLOCK_ROWS)])
        return s.new_zeros((B * N, s.shape[-1])).index_copy(0, rows, s).view(B, N, s.shape[-1])

    def forward(
        self,
        features: Tensor,
        mask: Optional[Tensor] = None,
        return_scores: bool = False,
        *,
        offsets: Optional[Tensor] = None,
        batch: Optional[Tensor] = None,
        num_bags: Optional[int] = None,
        chunk_size: Optional[int] = None,
    ):
        chunk_size = self.chunk_size if chunk_size is None else self._check_chunk_size(chunk_size)
        if offsets is not None or batch is not None or num_bags is not None:
            self._check_features(features, packed=True)
            if mask is not None:
                raise ValueError(
                    "AttentionPooling: mask goes with padded [B, N, D] or single-bag [N, D] features; packed "
                    "features (offsets/batch) have no padding"
                )
            pooled, weights, s = self._pool_packed(features, offsets, batch, num_bags, chunk_size)
        else:
            self._check_features(features, packed=False)
            if mask is not None:
                _v.check_mask(mask, _NAME, "mask")
            if chunk_size is not None:
                pooled, weights, s = self._pool_chunked(features, mask, chunk_size)
            elif features.dim() == 2:  # one bag [N, D], pooled as a batch of one
                m = None if mask is None else mask.unsqueeze(0)
                pooled, weights, s = self._pool_padded(features.unsqueeze(0), m)
                pooled, weights, s = pooled[0], weights[0], s[0]
            else:
                pooled, weights, s = self._pool_padded(features, mask)
        if return_scores:
            return pooled, weights, s
        return pooled, weights

    # ------------------------------------------------------------------ peers' checkpoints

    @classmethod
    def from_clam(cls, source, *, prefix: Optional[str] = None, dropout: Optional[float] = None):
        """An AttentionPooling holding the parameters of CLAM's ``Attn_Net`` / ``Attn_Net_Gated``
        (a module or a state dict, also nested in ``CLAM_SB`` / ``CLAM_MB``); see
        :func:`maskattn.nn.convert.from_clam`."""
        from .convert import from_clam

        return from_clam(source, prefix=prefix, dropout=dropout, cls=cls)

    @classmethod
    def from_torchmil(cls, source, *, act: Optional[str] = None, prefix: str = ""):
        """An AttentionPooling holding the parameters of torchmil's ``AttentionPool``; see
        :func:`maskattn.nn.convert.from_torchmil`."""
        from .convert import from_torchmil

        return from_torchmil(source, act=act, prefix=prefix, cls=cls)

    @classmethod
    def from_pyg(cls, source, *, act: Optional[str] = None, dropout: Optional[float] = None, prefix: str = ""):
        """An AttentionPooling holding the ``gate_nn`` parameters of PyG's
        ``AttentionalAggregation``; see :func:`maskattn.nn.convert.from_pyg`."""
        from .convert import from_pyg

        return from_pyg(source, act=act, dropout=dropout, prefix=prefix, cls=cls)

    def extra_repr(self) -> str:
        s = f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, gated={self.gated}, branches={self.branches}"
        if self.act != "tanh":
            s += f", act={self.act!r}"
        if not self.bias_last:
            s += ", bias_last=False"
        if self.chunk_size is not None:
            s += f", chunk_size={self.chunk_size}"
        return s
