"""Exact attention pooling in pieces: partial states, their log-sum-exp merge, and a chunked driver
that runs the scoring network chunk by chunk under activation checkpointing.

A bag's pooled vector is ``sum_i softmax(l)_i x_i`` over its valid rows. Split the rows into chunks
c; each chunk gives a *partial state* ``(p_c, s_c)``: ``p_c`` the softmax-weighted mean over the
chunk's valid rows (what ``masked_attention_pool`` returns for the chunk) and ``s_c`` the
log-sum-exp of the chunk's valid logits (``-inf`` for a chunk with none). Then, exactly,

    s = logsumexp_c s_c,        pooled = sum_c exp(s_c - s) p_c,

and ``(pooled, s)`` is again a partial state (of the union), so merging is associative and
commutative: chunks can be merged in any grouping, order, process or rank. Every weight ``exp(s_c -
s)`` lies in [0, 1] and they sum to 1, and each ``p_c`` is a convex combination of feature rows, so
nothing overflows in float32 whatever the logits' magnitude (unlike an unnormalised
``(max, sum exp, sum exp * x)`` state, whose accumulator scales with the chunk's size). The fused op
already returns the normalised ``p_c`` with its backward, so a partial state costs one fused pass
plus a log-sum-exp over the chunk's logits.
"""

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._ops.masked_attention_pool import masked_attention_pool, masked_attention_pool_packed

_NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _valid(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _finish_lse(s: Tensor, m: Tensor) -> Tensor:
    # log(s) + m, with s == 0 (nothing valid, or only -inf) giving -inf. Both wheres keep the
    # backward finite there: log's gradient at 0 would be inf, and inf * 0 is NaN. A NaN s (a NaN
    # logit) is not 0, so it stays NaN.
    empty = s == 0
    return torch.where(empty, _NEG_INF, torch.log(torch.where(empty, 1.0, s)) + m)


def _safe_shift(m: Tensor) -> Tensor:
    # The max is detached (log-sum-exp does not depend on it mathematically, so the gradient is
    # exact) and replaced by 0 where it is not finite: -inf (nothing valid) would give -inf - -inf,
    # +inf makes exp overflow to the +inf that torch.logsumexp returns, NaN stays NaN through exp.
    return torch.where(torch.isfinite(m), m, 0.0)


def _lse_dim(x: Tensor, dim: int) -> Tensor:
    """log-sum-exp over ``dim``: -inf where every entry is -inf (or there is none), with a finite
    (zero) gradient there, where ``torch.logsumexp``'s backward gives NaN."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        del shape[dim]
        return x.new_full(shape, _NEG_INF)
    m = _safe_shift(x.detach().amax(dim, keepdim=True))
    return _finish_lse(torch.exp(x - m).sum(dim), m.squeeze(dim))


def _lse_segments(x: Tensor, index: Tensor, num: int) -> Tensor:
    """log-sum-exp of the rows of ``x`` ([E] or [E, K]) grouped by ``index`` ([E], values in
    [0, num)) -> [num] or [num, K]; -inf for a group with no row or only -inf."""
    shape = (num,) + tuple(x.shape[1:])
    idx = index.view((-1,) + (1,) * (x.dim() - 1)).expand_as(x)
    m = x.new_full(shape, _NEG_INF).scatter_reduce(0, idx, x.detach(), "amax", include_self=True)
    m = _safe_shift(m)
    s = x.new_zeros(shape).index_add(0, index, torch.exp(x - m.index_select(0, index)))
    return _finish_lse(s, m)


def _bag_index(offsets: Tensor, rows: int) -> Tensor:
    counts = offsets[1:] - offsets[:-1]
    bags = torch.arange(counts.shape[0], device=offsets.device)
    # output_size spares the host sync repeat_interleave needs to size its result on CUDA
    return torch.repeat_interleave(bags, counts, output_size=rows)


@contextlib.contextmanager
def _named(name: str):
    # the op's own checks name the op and the argument; prefix the function the user called
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}") from e


# ---- partial states ----


def attention_pool_partial(logits: Tensor, features: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Partial state of attention pooling over (a chunk of) padded bags.

    Args:
        logits: ``[B, N]`` or ``[B, N, K]``.
        features: ``[B, N, D]``, any strides.
        mask: ``[B, N]`` valid mask of any dtype, or None (all valid).

    Returns:
        ``(pooled, lse)``: ``pooled`` ``[B, D]`` / ``[B, K, D]`` is ``masked_attention_pool``'s
        output for these rows (the softmax-weighted mean over the valid rows; zeros for a bag with
        none) and ``lse`` ``[B]`` / ``[B, K]`` the log-sum-exp of each bag's valid logits (``-inf``
        for a bag with no valid row or only ``-inf`` logits; NaN for a NaN logit, ``+inf`` for a
        ``+inf`` one, as ``torch.logsumexp``). ``lse`` is float32 for float16/bfloat16 logits.
        Merge partial states of the same bags with :func:`attention_pool_merge`. Differentiable.
    """
    with _named("attention_pool_partial"):
        pooled, _ = masked_attention_pool(logits, features, mask)
    x = logits.to(_opmath(logits.dtype))
    if mask is not None:
        valid = _valid(mask)
        x = x.masked_fill(~(valid.unsqueeze(-1) if x.dim() == 3 else valid), _NEG_INF)
    return pooled, _lse_dim(x, 1)


def attention_pool_partial_packed(logits: Tensor, features: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """Partial state of attention pooling over (a chunk of) packed bags.

    Args:
        logits: ``[T]`` or ``[T, K]``.
        features: ``[T, D]``.
        offsets: int64 ``[B+1]``, ``0 = offsets[0] <= ... <= offsets[B] = T``, as
            ``masked_attention_pool_packed`` takes them. For a chunk ``rows[s:e]`` of a packed
            batch with offsets ``o``, ``(o.clamp(s, e) - s)`` are the chunk's offsets: every bag
            keeps its index, bags outside the chunk are empty there.

    Returns:
        ``(pooled [B, D] / [B, K, D], lse [B] / [B, K])`` as :func:`attention_pool_partial`.
    """
    with _named("attention_pool_partial_packed"):
        pooled, _ = masked_attention_pool_packed(logits, features, offsets)
    x = logits.to(_opmath(logits.dtype))
    lse = _lse_segments(x, _bag_index(offsets, x.shape[0]), offsets.shape[0] - 1)
    return pooled, lse


def _merge(pooled: Tensor, lse: Tensor, index: Optional[Tensor], num: int) -> Tuple[Tensor, Tensor]:
    """Merge partial states along dim 0, all into one (index None) or grouped by ``index``."""
    acc = _opmath(pooled.dtype)
    lse = lse.to(torch.promote_types(lse.dtype, acc))
    if index is None:
        total = _lse_dim(lse, 0)
        diff = lse - total.unsqueeze(0)
    else:
        total = _lse_segments(lse, index, num)
        diff = lse - total.index_select(0, index)
    # A partial with lse = -inf (no valid row) takes weight 0, also when the total is -inf too,
    # where the difference is NaN; the where keeps that NaN out of the gradient as well. A NaN or
    # +inf total (a poisoned bag) makes every weight NaN: the bag is NaN, as the fused op gives.
    coef = torch.exp(torch.where(lse == _NEG_INF, _NEG_INF, diff))
    # A partial whose weight is 0 is skipped rather than multiplied: its pooled may hold NaN/inf
    # from a feature row the full softmax weighs 0 (the fused op never reads such rows).
    p = pooled.to(acc)
    p = torch.where((coef > 0).unsqueeze(-1), p, 0.0)
    terms = coef.unsqueeze(-1) * p
    if index is None:
        out = terms.sum(0)
    else:
        out = terms.new_zeros((num,) + tuple(terms.shape[1:])).index_add(0, index, terms)
    return out.to(pooled.dtype), total


def attention_pool_merge(
    pooled: Union[Tensor, Sequence[Tensor]], lse: Union[Tensor, Sequence[Tensor]], dim: int = 0
) -> Tuple[Tensor, Tensor]:
    """Merge partial states of the same bags into the exact pooled result.

    Args:
        pooled: partial pooled vectors stacked along ``dim`` (``[C, B, D]`` / ``[C, B, K, D]`` for
            ``dim=0``), or a sequence of C tensors ``[B, D]`` / ``[B, K, D]``.
        lse: the matching log-sum-exps, ``[C, B]`` / ``[C, B, K]`` or a sequence of C tensors.
        dim: the chunk axis of stacked inputs. The other axes are bags (and branches) and may
            be any: one bag's states ``[C, D]`` with ``lse`` ``[C]`` merge as well.

    ``attention_pool_merge(*zip(part_a, part_b, ...))`` merges ``(pooled, lse)`` pairs.

    Returns:
        ``(pooled, lse)`` of the union of the chunks: ``lse = logsumexp_c lse_c`` and
        ``pooled = sum_c exp(lse_c - lse) pooled_c`` -- itself a partial state, so merges nest. A
        bag that is empty in every chunk gives zeros and ``lse = -inf`` (zero gradient, never
        NaN); a NaN or ``+inf`` lse in any chunk makes the bag NaN. Differentiable: the gradients
        are those of the unchunked pooling.
    """
    if not isinstance(pooled, Tensor):
        pooled = torch.stack(list(pooled), dim)
    if not isinstance(lse, Tensor):
        lse = torch.stack(list(lse), dim)
    if dim < 0 or dim >= lse.dim():
        raise ValueError(
            f"attention_pool_merge: dim must be a non-negative chunk axis of lse {tuple(lse.shape)}, got {dim}"
        )
    pooled = pooled.movedim(dim, 0)
    lse = lse.movedim(dim, 0)
    if pooled.dim() < 2 or pooled.shape[:-1] != lse.shape:
        raise ValueError(
            "attention_pool_merge: pooled must be [C, B, (K,) D] and lse [C, B, (K,)] (chunk axis "
            f"{dim}), got pooled {tuple(pooled.shape)} and lse {tuple(lse.shape)}"
        )
    if not (pooled.is_floating_point() and lse.is_floating_point()):
        raise ValueError(f"attention_pool_merge: pooled and lse must be floating, got {pooled.dtype} and {lse.dtype}")
    return _merge(pooled, lse, None, 0)


def attention_pool_weights(
    logits: Tensor, lse: Tensor, mask: Optional[Tensor] = None, offsets: Optional[Tensor] = None
) -> Tensor:
    """Attention weights of (a chunk of) rows from the bag's global log-sum-exp.

    ``exp(logits - lse)`` at valid rows and exactly 0 at padding: with the ``lse`` that
    :func:`attention_pool_merge` returns, these are the weights the unchunked op gives for these
    rows. Padded: ``logits`` ``[B, n]`` / ``[B, n, K]``, ``lse`` ``[B]`` / ``[B, K]``, ``mask``
    ``[B, n]`` or None. Packed: ``logits`` ``[t]`` / ``[t, K]`` with ``offsets`` ``[B+1]`` over those
    rows (a chunk's offsets as in :func:`attention_pool_partial_packed`). A bag with
    ``lse = -inf`` gets zeros; a NaN or ``+inf`` lse gives NaN at every valid row (as
    ``torch.softmax`` of a row with a NaN or ``+inf`` logit). Differentiable in both.
    """
    if offsets is not None:
        if mask is not None:
            raise ValueError("attention_pool_weights: pass mask (padded) or offsets (packed), not both")
        total = lse.index_select(0, _bag_index(offsets, logits.shape[0]))
        valid = None
    else:
        if logits.dim() not in (2, 3) or lse.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                "attention_pool_weights: logits must be [B, n] or [B, n, K] and lse [B] or [B, K], got "
                f"logits {tuple(logits.shape)} and lse {tuple(lse.shape)}"
            )
        total = lse.unsqueeze(1)
        valid = None
        if mask is not None:
            valid = _valid(mask)
            if logits.dim() == 3:
                valid = valid.unsqueeze(-1)
    x = logits.to(torch.promote_types(_opmath(logits.dtype), lse.dtype))
    # torch.softmax poisons a row holding +inf (inf - inf); exp(finite - inf) alone would be 0.
    total = torch.where(total == float("inf"), float("nan"), total)
    keep = total != _NEG_INF
    if valid is not None:
        keep = keep & valid
    w = torch.exp(torch.where(keep, x - total, _NEG_INF))
    return w.to(logits.dtype)


# ---- chunked driver ----


def _check_scores(scores: Tensor, lead: Tuple[int, ...], features: Tensor) -> None:
    ok = isinstance(scores, Tensor) and (
        tuple(scores.shape) == lead or (scores.dim() == len(lead) + 1 and tuple(scores.shape[:-1]) == lead)
    )
    if not ok:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"chunked_attention_pool: score_fn must map features {tuple(features.shape)} to scores "
            f"{lead} or {lead + ('K',)}, got {got}"
        )


def _clear_nonfinite_padding(x: Tensor, mask: Tensor) -> Tensor:
    # The pool ignores padded rows, but inf/NaN stored there would reach the scoring network's
    # parameter gradients (and the features') through 0 * NaN (tanh'(NaN) = NaN). Finite padding is
    # scored as is, so the returned scores are score_fn(features) wherever that is finite.
    return x.masked_fill(~_valid(mask).unsqueeze(-1) & ~torch.isfinite(x), 0)


def _run(fn: Callable, use_checkpoint: bool, *args):
    if use_checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _Gather:
    """Each chunk's outputs (partial pooled, lse, scores), copied into buffers allocated at the
    first chunk, differentiably (in-place copies into slices).

    Holding the chunks' own small output tensors instead would fragment glibc's heap: allocated
    while the chunk's large activations are being freed, each lands in one of their freed blocks
    and splits it, so that the next chunk's activations no longer fit there, and the heap grows by
    about one activation per chunk (measured with benchmarks/mil_huge_bag_memory.py).
    """

    def __init__(self, num_states: int, rows: int, row_dim: int):
        self.num_states, self.rows, self.row_dim = num_states, rows, row_dim
        self.pooled = self.lse = self.scores = None
        self.state = self.row = 0

    def add(self, pooled: Tensor, lse: Tensor, scores: Tensor) -> None:
        if self.pooled is None:
            self.pooled = pooled.new_empty((self.num_states,) + tuple(pooled.shape[1:]))
            self.lse = lse.new_empty((self.num_states,) + tuple(lse.shape[1:]))
            shape = list(scores.shape)
            shape[self.row_dim] = self.rows
            self.scores = scores.new_empty(shape)
        n, r = pooled.shape[0], scores.shape[self.row_dim]
        self.pooled[self.state : self.state + n] = pooled
        self.lse[self.state : self.state + n] = lse
        self.scores.narrow(self.row_dim, self.row, r).copy_(scores)
        self.state, self.row = self.state + n, self.row + r


def _padded_chunks(score_fn, features, mask, chunk_size, single, use_checkpoint):
    def chunk(x, m):
        xs = x if m is None else _clear_nonfinite_padding(x, m)
        scores = score_fn(xs[0]) if single else score_fn(xs)
        _check_scores(scores, tuple(x.shape[1:2] if single else x.shape[:2]), xs[0] if single else xs)
        if single:
            scores = scores.unsqueeze(0)
        pooled, lse = attention_pool_partial(scores, x, m)
        return pooled, lse, scores

    # split (one backward node) rather than a slice per chunk: each slice's backward would write a
    # full-size zero gradient for features that require grad
    xs = features.split(chunk_size, dim=1)
    ms = mask.split(chunk_size, dim=1) if mask is not None else [None] * len(xs)
    # partial states stacked as [C * B, ...]: chunk-major, so [C, B, ...] after a view
    out = _Gather(len(xs) * features.shape[0], features.shape[1], 1)
    for x, m in zip(xs, ms):
        out.add(*_run(chunk, use_checkpoint, x, m))
    lead = (len(xs), features.shape[0])
    pooled, lse = attention_pool_merge(
        out.pooled.view(lead + tuple(out.pooled.shape[1:])), out.lse.view(lead + tuple(out.lse.shape[1:]))
    )
    return pooled, lse, out.scores


def _packed_chunks(score_fn, features, offsets, chunk_size, use_checkpoint):
    rows = features.shape[0]
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.dtype != torch.int64:
        raise ValueError(
            f"chunked_attention_pool: offsets must be int64 [B+1], got {offsets.dtype} {tuple(offsets.shape)}"
        )
    # Which bags a chunk touches is decided on the host (one sync on CUDA), so that each chunk
    # carries the partial states of its own bags only: B + #chunks states in all, not B * #chunks.
    host = offsets.detach().to("cpu")
    if host[0] != 0 or host[-1] != rows or bool((host[1:] < host[:-1]).any()):
        raise ValueError(
            f"chunked_attention_pool: offsets must rise from 0 to T = {rows} (features {tuple(features.shape)}), "
            f"got {host.tolist() if host.numel() <= 16 else tuple(host.shape)}"
        )
    num_bags = host.shape[0] - 1
    starts, ends = host[:-1], host[1:]

    def chunk(x, local):
        scores = score_fn(x)
        _check_scores(scores, (x.shape[0],), x)
        pooled, lse = attention_pool_partial_packed(scores, x, local)
        return pooled, lse, scores

    xs = features.split(chunk_size, dim=0) if rows > 0 else [features]
    bounds, s = [], 0
    for x in xs:
        e = s + x.shape[0]
        if rows > 0:
            b0 = int(torch.searchsorted(ends, s, right=True))  # first bag ending after s
            b1 = int(torch.searchsorted(starts, e, right=False))  # bags starting before e
        else:
            b0, b1 = 0, num_bags
        bounds.append((s, e, b0, b1))
        s = e
    index = torch.cat([torch.arange(b0, b1) for _, _, b0, b1 in bounds]).to(features.device)
    out = _Gather(index.shape[0], rows, 0)
    for x, (s, e, b0, b1) in zip(xs, bounds):
        local = (host[b0 : b1 + 1].clamp(s, e) - s).to(offsets.device)
        out.add(*_run(chunk, use_checkpoint, x, local))
    pooled, lse = _merge(out.pooled, out.lse, index, num_bags)
    return pooled, lse, out.scores


def chunked_attention_pool(
    score_fn: Callable[[Tensor], Tensor],
    features: Tensor,
    chunk_size: int,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    *,
    checkpoint: bool = True,
    return_weights: bool = True,
    return_scores: bool = False,
    return_lse: bool = False,
):
    """Attention pooling of huge bags with bounded memory, exact.

    Runs ``score_fn`` (the scoring network) on ``chunk_size`` rows at a time, each chunk under
    activation checkpointing, pools each chunk with the fused op and merges the chunks by
    log-sum-exp (:func:`attention_pool_merge`). The result and every gradient (``score_fn``'s
    parameters, ``features``) equal those of ``masked_attention_pool(score_fn(features), features,
    mask)`` up to rounding, while the forward + backward keeps only O(chunk) activations of the
    scoring network alive instead of O(N): the chunk is scored again in the backward.

    Args:
        score_fn: maps features ``[..., n, D]`` to scores ``[..., n]`` or ``[..., n, K]``, row by
            row (an instance's score may depend on that instance only: an MLP, CLAM's gated
            attention, ``AttentionPooling.scores``). Dropout in it is fine: the checkpoint replays
            the RNG state.
        features: a single bag ``[N, D]`` (``mask`` ``[N]`` or None), padded bags ``[B, N, D]``
            (``mask`` ``[B, N]`` or None; chunks along N) or packed bags ``[T, D]`` with
            ``offsets`` ``[B+1]`` (chunks along the rows; a chunk may span several bags).
        chunk_size: rows per chunk (the last one may be shorter); any size >= 1.
        checkpoint: run each chunk under ``torch.utils.checkpoint`` (``use_reentrant=False``).
            Without it the result is the same, the memory is not bounded.
        return_weights: also return the attention weights (``None`` in their place otherwise).
        return_scores: also return the scores (``score_fn`` of every row).
        return_lse: also return each bag's log-sum-exp: ``(pooled, lse)`` is the partial state of
            these rows, to merge with other ranks' (:func:`maskattn.distributed.merge_across_ranks`).

    Returns:
        ``(pooled, weights[, scores][, lse])``: ``pooled`` ``[D]`` / ``[B, D]`` (``[.., K, D]``
        with K branches), ``weights`` and ``scores`` shaped as the scores, ``lse`` ``[]`` / ``[B]``
        (``[.., K]``). Padded rows of padded bags whose features hold inf/NaN are replaced by 0
        before ``score_fn``, so such content reaches no output and no gradient.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_attention_pool: chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise ValueError("chunked_attention_pool: features must be a floating tensor")
    single = False
    if offsets is not None:
        if mask is not None:
            raise ValueError("chunked_attention_pool: pass mask (padded, single bag) or offsets (packed), not both")
        if features.dim() != 2:
            raise ValueError(f"chunked_attention_pool: packed features must be [T, D], got {tuple(features.shape)}")
        pooled, lse, scores = _packed_chunks(score_fn, features, offsets, chunk_size, checkpoint)
        weights = attention_pool_weights(scores, lse, offsets=offsets) if return_weights else None
    else:
        if features.dim() == 2:
            single = True
            if mask is not None and tuple(mask.shape) != tuple(features.shape[:1]):
                raise ValueError(
                    f"chunked_attention_pool: mask of a single bag {tuple(features.shape)} must be "
                    f"[{features.shape[0]}], got {tuple(mask.shape)}"
                )
            features = features.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None else None
        elif features.dim() != 3:
            raise ValueError(
                f"chunked_attention_pool: features must be [N, D], [B, N, D] or packed [T, D] with offsets, "
                f"got {tuple(features.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(
                f"chunked_attention_pool: mask must be {tuple(features.shape[:2])} for features "
                f"{tuple(features.shape)}, got {tuple(mask.shape)}"
            )
        pooled, lse, scores = _padded_chunks(score_fn, features, mask, chunk_size, single, checkpoint)
        weights = attention_pool_weights(scores, lse, mask) if return_weights else None
        if single:
            pooled, lse, scores = pooled[0], lse[0], scores[0]
            weights = weights[0] if weights is not None else None
    out: List[Optional[Tensor]] = [pooled, weights]
    if return_scores:
        out.append(scores)
    if return_lse:
        out.append(lse)
    return tuple(out)
