"""Segment indices (PyG's ``batch`` vector: the bag id of every row) and packed offsets.

``masked_attention_pool_packed`` reads bags as contiguous row ranges ``offsets[b]:offsets[b+1]``.
Graph libraries describe the same data with one bag id per row. A sorted id vector converts to
offsets directly; an unsorted one does not (offsets built from it describe other bags than the ids
do, and the pooled result is silently wrong), so ``offsets_from_batch`` checks sortedness and
``sort_by_batch`` reorders the rows (stably) for callers whose rows are interleaved.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


def _check_batch(fn: str, batch: Tensor) -> None:
    if not isinstance(batch, Tensor):
        raise TypeError(f"{fn}: batch must be a 1-D integer tensor of bag ids, got {type(batch).__name__}")
    if batch.dim() != 1 or batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
        raise ValueError(
            f"{fn}: batch must be a 1-D integer tensor of bag ids [T], got {batch.dtype} shape {tuple(batch.shape)}"
        )


def _check_num_bags(fn: str, num_bags) -> None:
    if num_bags is not None and (isinstance(num_bags, bool) or not isinstance(num_bags, int) or num_bags < 0):
        raise ValueError(f"{fn}: num_bags must be an int >= 0 or None, got {num_bags!r}")


def _infer_num_bags(batch: Tensor) -> int:
    # The number of bags is a shape: reading it from the data costs one host sync on CUDA.
    return int(batch.max().item()) + 1 if batch.numel() else 0


def _check_range(fn: str, batch: Tensor, num_bags: int) -> None:
    if batch.numel() == 0:
        return
    lo, hi = int(batch.min().item()), int(batch.max().item())
    if lo < 0 or hi >= num_bags:
        raise ValueError(
            f"{fn}: batch holds bag ids in [{lo}, {hi}], outside [0, num_bags={num_bags}); "
            "pass num_bags >= max id + 1 (or leave it None)"
        )


def _check_sorted(fn: str, batch: Tensor) -> None:
    if batch.numel() < 2:
        return
    down = batch[1:] < batch[:-1]
    if bool(down.any()):
        i = int(down.nonzero()[0, 0].item()) + 1
        raise ValueError(
            f"{fn}: batch must be sorted (non-decreasing) to convert to offsets; batch[{i}] = "
            f"{int(batch[i])} < batch[{i - 1}] = {int(batch[i - 1])} (first out-of-order position {i} of "
            f"T={batch.numel()}). Rows of one bag must be contiguous: reorder them with "
            "maskattn.sort_by_batch(batch, *tensors)"
        )


def offsets_from_batch(batch: Tensor, num_bags: Optional[int] = None, *, check: Optional[bool] = None) -> Tensor:
    """PyG-style bag ids ``[T]`` (sorted) -> packed offsets int64 ``[num_bags + 1]``.

    ``offsets[b]`` is the number of rows whose id is ``< b``, so bags with no rows (between ids, or
    after the largest with ``num_bags``) are empty bags: ``batch = [0, 0, 2]`` gives
    ``[0, 2, 2, 3]``. A PyG ``Batch`` already carries these offsets as ``ptr``.

    Args:
        batch: 1-D integer tensor, the bag id of every row, non-decreasing (PyG's ``batch`` /
            ``index``; ``torch.repeat_interleave(torch.arange(B), sizes)``).
        num_bags: the number of bags B (``dim_size`` in PyG). ``None`` takes ``batch.max() + 1``
            (0 for an empty batch), which reads the maximum back to the host: one sync on CUDA.
        check: verify that ids are sorted and in ``[0, num_bags)`` and raise ``ValueError`` naming
            the first out-of-order position. ``None`` (default): check on CPU, not on CUDA, where
            the check is a host sync; ``True`` checks on CUDA too. Unchecked unsorted ids give
            offsets that do not describe the ids (still within ``[0, T]``, so nothing reads out of
            bounds). For unsorted ids use :func:`sort_by_batch`.

    The conversion itself is a binary search (``searchsorted``) with no sync when ``num_bags`` is
    given, so it can run inside a CUDA graph with ``check=False``.

    Example::

        x = torch.randn(5, 8)
        batch = torch.tensor([0, 0, 0, 1, 1])
        pooled, w = maskattn.masked_attention_pool_packed(gate(x).squeeze(-1), x, maskattn.offsets_from_batch(batch))
    """
    fn = "offsets_from_batch"
    _check_batch(fn, batch)
    _check_num_bags(fn, num_bags)
    if check is None:
        check = not batch.is_cuda
    if check:
        _check_sorted(fn, batch)
    if num_bags is None:
        num_bags = _infer_num_bags(batch)
    if check:
        _check_range(fn, batch, num_bags)
    bounds = torch.arange(num_bags + 1, device=batch.device, dtype=torch.int64)
    return torch.searchsorted(batch.to(torch.int64).contiguous(), bounds, side="left")


def packed_offsets(fn: str, offsets: Optional[Tensor], batch: Optional[Tensor], num_bags) -> Tensor:
    """The offsets of a packed call given ``offsets`` or PyG's ``batch`` (+ ``num_bags``), one of them."""
    if batch is not None:
        if offsets is not None:
            raise ValueError(f"{fn}: pass offsets or batch, not both")
        return offsets_from_batch(batch, num_bags)
    if num_bags is not None:
        if offsets is None:
            raise ValueError(f"{fn}: num_bags goes with batch= (the bag id of every row)")
        raise ValueError(f"{fn}: num_bags goes with batch=; offsets already fix B")
    if offsets is None:
        raise ValueError(f"{fn}: offsets [B+1] (or batch=, the bag id of every row) is required")
    return offsets


def batch_from_offsets(offsets: Tensor, total: Optional[int] = None) -> Tensor:
    """Packed offsets ``[B+1]`` -> the bag id of every row, int64 ``[T]`` (the inverse of
    :func:`offsets_from_batch`; PyG's ``batch``).

    ``total`` is T (``features.shape[0]``); ``None`` reads ``offsets[-1]`` back: one sync on CUDA.
    """
    fn = "batch_from_offsets"
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{fn}: offsets must be a 1-D [B+1] integer tensor, got {_describe(offsets)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: offsets must be int64 or int32, got {offsets.dtype}")
    offsets = offsets.to(torch.int64)
    if total is None:
        total = int(offsets[-1].item())
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"{fn}: total must be an int >= 0 (T, the number of rows), got {total!r}")
    if not offsets.is_cuda:
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != total or any(b < a for a, b in zip(o, o[1:])):
            shown = o if len(o) <= 16 else o[:16] + ["..."]
            raise ValueError(f"{fn}: offsets must rise from 0 to total={total}, got {shown}")
    # searchsorted rather than repeat_interleave: with unchecked (CUDA) offsets that do not sum to
    # total it still writes exactly `total` ids, each in [0, B-1].
    batch = offsets.shape[0] - 1
    rows = torch.arange(total, device=offsets.device, dtype=torch.int64)
    ids = torch.searchsorted(offsets[1:].contiguous(), rows, side="right")
    return ids.clamp_(max=max(batch - 1, 0))


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} shape {tuple(x.shape)}"
    return type(x).__name__


class SortedByBatch(NamedTuple):
    """What :func:`sort_by_batch` returns.

    - ``tensors``: the inputs with their rows (dim 0) reordered so that each bag is contiguous.
    - ``offsets``: int64 ``[num_bags + 1]`` for the sorted rows.
    - ``batch``: the sorted bag ids.
    - ``perm``: ``sorted = x[perm]`` (a stable sort: rows of one bag keep their order).
    - ``inverse``: ``x = sorted[inverse]``; maps per-row outputs (attention weights) back to the
      caller's row order.
    """

    tensors: Tuple[Tensor, ...]
    offsets: Tensor
    batch: Tensor
    perm: Tensor
    inverse: Tensor


def sort_by_batch(batch: Tensor, *tensors: Tensor, num_bags: Optional[int] = None) -> SortedByBatch:
    """Reorder rows whose bag ids are not sorted so that they can be pooled as packed bags.

    A stable sort of ``batch``: rows of one bag keep their relative order, so the pooled result
    equals PyG's scatter softmax on the unsorted rows. Every tensor in ``tensors`` must have T rows
    (dim 0) and is gathered along dim 0 (differentiable).

    ``num_bags=None`` takes ``batch.max() + 1`` (one host sync on CUDA). Ids are checked to lie in
    ``[0, num_bags)`` on CPU; on CUDA they are not (the check would sync) and out-of-range ids give
    wrong offsets, but nothing reads out of bounds.

    Example (rows of two graphs interleaved)::

        batch = torch.tensor([1, 0, 1, 0, 0])
        s = maskattn.sort_by_batch(batch, logits, x)
        pooled, w_sorted = maskattn.masked_attention_pool_packed(*s.tensors, s.offsets)
        w = w_sorted[s.inverse]  # weights in the caller's row order
    """
    fn = "sort_by_batch"
    _check_batch(fn, batch)
    _check_num_bags(fn, num_bags)
    total = batch.shape[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != total:
            raise ValueError(f"{fn}: tensors[{i}] must have T={total} rows (dim 0), got {_describe(t)}")
        if t.device != batch.device:
            raise ValueError(f"{fn}: tensors[{i}] ({t.device}) and batch ({batch.device}) must be on the same device")
    if num_bags is None:
        num_bags = _infer_num_bags(batch)
    if not batch.is_cuda:
        _check_range(fn, batch, num_bags)
    sorted_batch, perm = torch.sort(batch, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(total, device=batch.device, dtype=perm.dtype)
    offsets = offsets_from_batch(sorted_batch, num_bags, check=False)
    return SortedByBatch(tuple(t[perm] for t in tensors), offsets, sorted_batch, perm, inverse)
