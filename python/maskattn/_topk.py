"""Top-k instances per bag over padded or packed scores (CLAM's instance selection, batched).

CLAM picks the k most and k least attended instances of a single bag with
``torch.topk(A, k)[1][-1]`` and ``torch.topk(-A, k, dim=1)[1][-1]``. Over a padded batch that
call would select padding, and over packed bags it has no notion of bags at all; a bag shorter
than k makes ``torch.topk`` raise. Here every bag gets exactly k slots and a validity mask.

The selection is a stable sort, not ``torch.topk``: ``torch.topk`` leaves the order of ties
unspecified (it differs between CPU and CUDA), and the padding must lose every tie, including
against valid ``-inf`` scores. The sort key is (valid first, score, position), so ties go to
the lower position and the result is the same on every device. The cost is a sort of the scores,
which is small next to the features the indices are used to gather.
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


def _padded(scores: Tensor, k: int, mask: Optional[Tensor], largest: bool) -> TopKPerBag:
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
    if scores.dim() == 3:
        valid = valid.unsqueeze(-1).expand(scores.shape)
    kk = min(k, n)
    # Stable sort by score (ties keep position order), then pick the first kk valid entries of that
    # order: the key position + N * invalid is unique per bag, so this topk has no ties to break.
    order = torch.sort(scores.detach(), dim=1, descending=largest, stable=True).indices
    valid_sorted = valid.gather(1, order)
    pos = torch.arange(n, device=dev, dtype=torch.int64).view((1, n) + (1,) * (scores.dim() - 2))
    key = pos + (~valid_sorted).to(torch.int64) * n
    take = torch.topk(key, kk, dim=1, largest=False, sorted=True).indices
    idx = order.gather(1, take)
    ok = valid_sorted.gather(1, take)
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    values = torch.where(ok, scores.gather(1, idx), torch.zeros((), dtype=scores.dtype, device=dev))
    if kk < k:
        pad = (0, 0) * (scores.dim() - 2) + (0, k - kk)
        values = torch.nn.functional.pad(values, pad)
        idx = torch.nn.functional.pad(idx, pad)
        ok = torch.nn.functional.pad(ok, pad)
    return TopKPerBag(values, idx, ok)


def _packed(scores: Tensor, k: int, mask: Optional[Tensor], offsets: Tensor, largest: bool) -> TopKPerBag:
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
    extra = scores.shape[1:]  # () or (K,)
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
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    # With no rows at all index 0 does not exist: gather from one zero row (stays in the graph).
    src = scores if t else torch.cat([scores, scores.new_zeros((1,) + extra)])
    if len(extra):
        values = src.gather(0, idx.reshape(b * k, *extra)).view((b, k) + extra)
    else:
        values = src[idx]
    values = torch.where(ok, values, torch.zeros((), dtype=scores.dtype, device=dev))
    return TopKPerBag(values, idx, ok.contiguous())


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
    No host sync on CUDA (k is a Python int; bag lengths stay on the device).

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
