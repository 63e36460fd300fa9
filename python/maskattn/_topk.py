"""Top-k instances per bag over padded or packed scores (CLAM's instance selection, batched).

CLAM picks the k most and k least attended instances of a single bag with
``torch.topk(A, k)[1][-1]`` and ``torch.topk(-A, k, dim=1)[1][-1]``. Over a padded batch that
call would select padding, and over packed bags it has no notion of bags at all; a bag shorter
than k makes ``torch.topk`` raise. Here every bag gets exactly k slots and a validity mask.

``torch.topk`` alone cannot be the answer: it leaves the order of ties unspecified (CPU and CUDA
differ), and a padding sentinel ties with valid ``-inf`` scores. So ``torch.topk`` only finds
each bag's k-th best *value* (the threshold); the instances strictly better than it are all
taken, the ties at it are taken lowest position first, and the k chosen ones are ordered by a
stable sort of k values. Everything is linear in N except that k-element sort. Packed bags on
CPU are padded first (a sync is free there); on CUDA they are ranked by two stable sorts over all
rows instead, because the longest bag (the padded width) cannot be read without a sync.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class TopKPerBag(NamedTuple):
    """What :func:`topk_per_bag` returns (all three have the same shape)."""

    values: Tensor
    indices: Tensor
    valid: Tensor


def _check_mask(fn: str, mask: Tensor, expected, scores: Tensor) -> None:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(expected):
        raise ValueError(
            f"{fn}: mask must be {list(expected)} to match scores {list(scores.shape)}, got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
        )
    if mask.dtype.is_complex:
        raise ValueError(f"{fn}: mask must be a bool, integer or floating tensor, got {mask.dtype}")
    if mask.device != scores.device:
        raise ValueError(f"{fn}: mask ({mask.device}) and scores ({scores.device}) must be on the same device")


def _better(x: Tensor, thr: Tensor, largest: bool) -> Tensor:
    """x ranks strictly above thr in torch.topk's order (NaN above +inf)."""
    nan_x, nan_t = torch.isnan(x), torch.isnan(thr)
    if largest:
        return (x > thr) | (nan_x & ~nan_t)
    return (x < thr) | (~nan_x & nan_t)


def _select_rows(s: Tensor, valid: Tensor, k: int, largest: bool, host_checks: bool):
    """Rows of s [R, N] (detached), valid bool [R, N], 1 <= k <= N -> (positions [R, k], ok [R, k]).

    host_checks: data-dependent shortcuts that read values back (free on CPU, a sync on CUDA).
    """
    rows, n = s.shape
    dev = s.device
    sentinel = torch.full((), float("-inf") if largest else float("inf"), dtype=s.dtype, device=dev)
    w = torch.where(valid, s, sentinel)
    m = torch.count_nonzero(valid, dim=1).clamp(max=k)  # slots that get an instance
    slot = torch.arange(k, device=dev)
    ok = slot.unsqueeze(0) < m.unsqueeze(1)
    top_v, top_i = torch.topk(w, k, dim=1, largest=largest, sorted=True)
    # thr: the m-th best value among the valid entries. Padding sits at the sentinel, at or below
    # every valid value, so it never moves the threshold and is never strictly better than it.
    # Everything strictly better than thr is among topk's k (it outranks the m-th best), and
    # first in its sorted output; only the entries tied at thr are left to choose, by position.
    thr = top_v.gather(1, (m - 1).clamp(min=0).unsqueeze(1))
    n_better = torch.count_nonzero(_better(top_v, thr, largest) & ok, dim=1)
    need = m - n_better
    thr_nan = torch.isnan(thr)
    if host_checks and not bool(thr_nan.any()):
        tied = (w == thr) & valid
    else:
        tied = ((w == thr) | (torch.isnan(w) & thr_nan)) & valid
    if (
        host_checks
        and bool((torch.count_nonzero(tied, dim=1) == need).all())
        and bool(valid.gather(1, top_i)[ok].all())
    ):
        # No tie crosses the threshold and topk picked no padding: its k are the right set.
        picked = top_i
    else:
        rank = torch.cumsum(tied, 1, dtype=torch.int64)
        take = tied & (rank <= need.unsqueeze(1))
        dest = torch.where(take, n_better.unsqueeze(1) + rank - 1, k)
        pos = torch.arange(n, device=dev, dtype=torch.int64).expand(rows, n)
        chosen = torch.zeros(rows, k + 1, dtype=torch.int64, device=dev).scatter(1, dest, pos)[:, :k]
        picked = torch.where(slot.unsqueeze(0) < n_better.unsqueeze(1), top_i, chosen)
    # Order the k picked by (value, then position): sort by position, then a stable sort by value,
    # then a stable sort that returns the empty slots (a suffix) to the end, whatever they hold.
    by_pos = torch.sort(torch.where(ok, picked, n + slot), dim=1).indices
    picked, ok_p = picked.gather(1, by_pos), ok.gather(1, by_pos)
    by_val = torch.sort(w.gather(1, picked), dim=1, descending=largest, stable=True).indices
    picked, ok_p = picked.gather(1, by_val), ok_p.gather(1, by_val)
    back = torch.sort((~ok_p).to(torch.uint8), dim=1, stable=True).indices
    return picked.gather(1, back), ok


def _empty_result(shape, dtype, device, like: Tensor) -> "TopKPerBag":
    values = torch.zeros(shape, dtype=dtype, device=device)
    if like.requires_grad and like.numel() == 0:
        values = values + like.sum()  # 0, and in the graph: a loss on the values can backpropagate
    return TopKPerBag(
        values,
        torch.zeros(shape, dtype=torch.int64, device=device),
        torch.zeros(shape, dtype=torch.bool, device=device),
    )


def _padded(
    scores: Tensor, k: int, mask: Optional[Tensor], largest: bool, host_checks: Optional[bool] = None
) -> TopKPerBag:
    # host_checks: CPU shortcuts (default off on CUDA, where they would sync); tests force both.
    fn = "topk_per_bag"
    if scores.dim() not in (2, 3):
        raise ValueError(f"{fn}: padded scores must be [B, N] or [B, N, K], got shape {tuple(scores.shape)}")
    b, n = scores.shape[0], scores.shape[1]
    dev = scores.device
    if mask is None:
        valid = torch.ones((b, n), dtype=torch.bool, device=dev)
    else:
        _check_mask(fn, mask, (b, n), scores)
        valid = mask != 0
    extra = tuple(scores.shape[2:])  # () or (K,)
    kk = min(k, n)
    out_shape = (b, k) + extra
    if kk == 0:
        return _empty_result(out_shape, scores.dtype, dev, scores)
    if extra:  # branches become rows: [B, N, K] -> [B*K, N]
        kb = extra[0]
        s2 = scores.permute(0, 2, 1).reshape(b * kb, n)
        v2 = valid.unsqueeze(1).expand(b, kb, n).reshape(b * kb, n)
    else:
        s2, v2 = scores, valid
    if host_checks is None:
        host_checks = not scores.is_cuda
    idx, ok = _select_rows(s2.detach(), v2, kk, largest, host_checks)
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    values = torch.where(ok, s2.gather(1, idx), torch.zeros((), dtype=scores.dtype, device=dev))
    if kk < k:
        values = torch.nn.functional.pad(values, (0, k - kk))
        idx = torch.nn.functional.pad(idx, (0, k - kk))
        ok = torch.nn.functional.pad(ok, (0, k - kk))
    if extra:
        values, idx, ok = (t.view(b, kb, k).transpose(1, 2).contiguous() for t in (values, idx, ok))
    return TopKPerBag(values, idx, ok)


def _packed(
    scores: Tensor,
    k: int,
    mask: Optional[Tensor],
    offsets: Tensor,
    largest: bool,
    sync_free: Optional[bool] = None,
    host_checks: Optional[bool] = None,
) -> TopKPerBag:
    # sync_free: the CUDA algorithm (default on CUDA only); host_checks: the CPU shortcuts of the
    # padded selection. The tests force each on CPU as well.
    fn = "topk_per_bag"
    if scores.dim() not in (1, 2):
        raise ValueError(f"{fn}: packed scores must be [T] or [T, K] (with offsets), got shape {tuple(scores.shape)}")
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(
            f"{fn}: offsets must be a 1-D int64 [B+1] tensor, got "
            f"{tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__}"
        )
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: offsets must be int64 (or int32), got {offsets.dtype}")
    if offsets.device != scores.device:
        raise ValueError(f"{fn}: offsets ({offsets.device}) and scores ({scores.device}) must be on the same device")
    t = scores.shape[0]
    dev = scores.device
    offsets = offsets.to(torch.int64)
    b = offsets.shape[0] - 1
    if not scores.is_cuda:
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != t or any(y < x for x, y in zip(o, o[1:])):
            shown = o if len(o) <= 16 else o[:16] + ["..."]
            raise ValueError(f"{fn}: offsets must rise from 0 to T={t}, got {shown}")
    if mask is None:
        valid = None
    else:
        _check_mask(fn, mask, (t,), scores)
        valid = mask != 0
    extra = tuple(scores.shape[1:])  # () or (K,)
    col = (1,) * len(extra)
    if sync_free is None:
        sync_free = scores.is_cuda
    if sync_free:
        idx, ok = _packed_ranks_by_sorting(scores, k, valid, offsets, largest)
    else:
        # On CPU the bag lengths are free to read: pad the (detached) scores, one slice copy per
        # bag (cheaper than a scattered index_put), and select per row.
        o = offsets.tolist()
        max_len = max((y - x for x, y in zip(o, o[1:])), default=0)
        padded = scores.new_empty((b, max_len) + extra)
        pmask = torch.zeros((b, max_len), dtype=torch.bool)
        src = scores.detach()
        for i in range(b):
            n_i = o[i + 1] - o[i]
            padded[i, :n_i] = src[o[i] : o[i + 1]]
            pmask[i, :n_i] = True if valid is None else valid[o[i] : o[i + 1]]
        sel = _padded(padded, k, pmask, largest, host_checks)
        ok = sel.valid
        idx = torch.where(ok, sel.indices + offsets[:-1].view((b, 1) + col), 0)
    # With no rows at all index 0 does not exist: gather from one zero row (stays in the graph).
    src = scores if t else torch.cat([scores, scores.new_zeros((1,) + extra)])
    if extra:
        values = src.gather(0, idx.reshape(b * k, *extra)).view((b, k) + extra)
    else:
        values = src[idx]
    values = torch.where(ok, values, torch.zeros((), dtype=scores.dtype, device=dev))
    return TopKPerBag(values, idx, ok.contiguous())


def _packed_ranks_by_sorting(scores: Tensor, k: int, valid: Optional[Tensor], offsets: Tensor, largest: bool):
    """(global rows [B, k(, K)], ok) without reading any bag length back to the host."""
    t, dev = scores.shape[0], scores.device
    b = offsets.shape[0] - 1
    extra = tuple(scores.shape[1:])
    col = (1,) * len(extra)

    # Bag id per row without repeat_interleave (whose output size must match the offsets' sum, which
    # on CUDA is unchecked): a binary search, in range for any offsets.
    rows = torch.arange(t, device=dev, dtype=torch.int64)
    bag = torch.searchsorted(offsets[1:].contiguous(), rows, side="right").clamp_(max=max(b - 1, 0))

    # Stable sort by score, then a stable sort by (bag, invalid): within each bag, valid rows in
    # score order (ties by row), then invalid rows. Two global sorts and no per-bag loop: the number
    # of rows per bag never has to reach the host.
    order = torch.sort(scores.detach(), dim=0, descending=largest, stable=True).indices
    group = bag.view((t,) + col).expand(scores.shape).gather(0, order) * 2
    if valid is not None:
        group = group + (~valid).to(torch.int64).view((t,) + col).expand(scores.shape).gather(0, order)
    regroup = torch.sort(group, dim=0, stable=True).indices
    perm = order.gather(0, regroup)  # global row indices, bag by bag
    bag_sorted = bag.view((t,) + col).expand(scores.shape).gather(0, perm)
    rank = rows.view((t,) + col) - offsets[bag_sorted]

    # Scatter the first k of every bag into [B*k, ...]; the rest goes to T scratch slots (one per
    # row, so every destination is unique and the scatter is deterministic) that are cut off.
    keep = (rank >= 0) & (rank < k)
    dest = torch.where(keep, bag_sorted * k + rank, b * k + rows.view((t,) + col))
    idx = torch.zeros((b * k + t,) + extra, dtype=torch.int64, device=dev)
    idx = idx.scatter(0, dest, perm)[: b * k].view((b, k) + extra)

    lengths = offsets[1:] - offsets[:-1]
    if valid is None:
        count = lengths
    else:
        csum = torch.cat([valid.new_zeros(1, dtype=torch.int64), torch.cumsum(valid.to(torch.int64), 0)])
        count = csum[offsets[1:].clamp(0, t)] - csum[offsets[:-1].clamp(0, t)]
    slot = torch.arange(k, device=dev, dtype=torch.int64)
    ok = (slot.unsqueeze(0) < count.unsqueeze(1)).view((b, k) + col).expand((b, k) + extra)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok


def topk_per_bag(
    scores: Tensor,
    k: int,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    largest: bool = True,
) -> TopKPerBag:
    """The k highest (or lowest) scoring instances of every bag, padding never selected.

    Batched CLAM instance selection: ``topk_per_bag(A, k)`` gives what
    ``torch.topk(A_b, k)[1]`` gives for each bag (largest), ``largest=False`` what
    ``torch.topk(-A_b, k)[1]`` gives (smallest), in one call over the whole batch.

    Args:
        scores: padded ``[B, N]`` or ``[B, N, K]`` (K attention branches, selected per branch), or
            packed ``[T]`` / ``[T, K]`` when ``offsets`` is given. Attention logits or weights; any
            floating dtype.
        k: slots per bag (a Python int >= 0). Bags with fewer than k selectable instances fill the
            rest with invalid slots; ``k`` larger than N is allowed.
        mask: valid mask of any dtype (nonzero = selectable): ``[B, N]`` (padded) or ``[T]``
            (packed, e.g. to exclude instances). ``None``: every position (padded) / row (packed)
            is selectable.
        offsets: int64 ``[B+1]`` for packed scores (as in ``masked_attention_pool_packed``). On CPU
            bad offsets raise; on CUDA they are not checked (that would sync), and nothing reads
            out of bounds.
        largest: True for the highest scores, False for the lowest.

    Returns:
        ``TopKPerBag(values, indices, valid)``, each ``[B, k]`` (``[B, k, K]`` with branches),
        slots in rank order (best first):

        - ``indices``: padded: the position within the bag (index into dim 1, for
          ``torch.take_along_dim(features, indices[..., None], 1)``); packed: the global row of
          the packed tensor, so ``features[indices]`` is ``[B, k, D]``.
        - ``valid``: bool, False in slots past a bag's number of selectable instances (never
          otherwise: padding and masked rows are never selected while a selectable instance
          remains, and selectable ``-inf`` or NaN scores are selected like any other).
        - invalid slots hold index 0 and value 0 (index 0 is in range whenever the tensor has a
          row, so gathers never fail; mask their results with ``valid``).
        - ``values``: ``scores`` at ``indices``, differentiable (a gather); 0 with zero gradient in
          invalid slots.

    Ordering: ties go to the lower position (row), for largest and smallest alike; NaN ranks
    above ``+inf`` (as in ``torch.sort`` / ``torch.topk``). Deterministic on every device.
    No host sync on CUDA (k is a Python int; bag lengths stay on the device). Cost: a few
    elementwise passes and one ``torch.topk`` over the scores (packed on CUDA: two stable sorts
    of all rows instead).

    Example (CLAM's instance clustering over a packed batch)::

        logits, weights = ...  # attention over packed instances h [T, D], offsets [B+1]
        top = maskattn.topk_per_bag(weights, k, offsets=offsets)
        bottom = maskattn.topk_per_bag(weights, k, offsets=offsets, largest=False)
        inst = h[torch.cat([top.indices, bottom.indices], 1)]  # [B, 2k, D]
        ok = torch.cat([top.valid, bottom.valid], 1)  # [B, 2k]
        loss = F.cross_entropy(instance_classifier(inst[ok]), targets[ok])
    """
    fn = "topk_per_bag"
    if not isinstance(scores, Tensor):
        raise TypeError(f"{fn}: scores must be a tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"{fn}: scores must be a floating tensor, got {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{fn}: k must be a Python int >= 0, got {k!r}")
    if offsets is None:
        return _padded(scores, k, mask, bool(largest))
    return _packed(scores, k, mask, offsets, bool(largest))
