"""Batching variable-size bags for ``torch.utils.data.DataLoader``.

MIL pipelines usually train one bag per step because bags of different sizes do not stack
(CLAM hard-codes a batch size of 1). Two pieces remove that limit:

- :func:`collate_bags` / :class:`BagCollator`: a ``collate_fn`` that turns a list of bags into a
  packed batch (``features [T, D]``, ``offsets [B+1]``, for ``masked_attention_pool_packed``) or a
  padded one (``features [B, N_max, D]``, ``mask [B, N_max]``, for ``masked_attention_pool``),
  plus labels and any other per-bag or per-instance fields.
- :class:`BagBatchSampler`: a ``batch_sampler`` that groups bags under an instance budget (the
  memory a step may use), buckets bags of similar size (little padding in the padded layout),
  shuffles per epoch, and splits the batches across distributed ranks.

Example::

    sizes = [len(bag) for bag in dataset]  # or read from the feature files' metadata
    sampler = maskattn.data.BagBatchSampler(sizes, max_instances=60_000, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=maskattn.data.BagCollator("packed"),
                        num_workers=4, pin_memory=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            logits = attention_net(batch.features).squeeze(-1)
            pooled, weights = maskattn.masked_attention_pool_packed(logits, batch.features, batch.offsets)
            loss = F.cross_entropy(classifier(pooled), batch.labels)
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from ._padding import unpack
from ._segments import batch_from_offsets

__all__ = ["BagBatch", "BagCollator", "collate_bags", "BagBatchSampler"]

_LAYOUTS = ("packed", "padded")


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


@dataclasses.dataclass
class BagBatch:
    """A batch of bags, packed or padded (what :func:`collate_bags` returns).

    Attributes:
        features: packed ``[T, D]`` (bags back to back) or padded ``[B, N_max, D]``.
        labels: the per-bag labels collated by ``default_collate`` (``[B]`` for int / float / 0-dim
            labels, ``[B, C]`` for ``[C]`` labels), a list when they do not stack, or None when
            the samples carry no label.
        lengths: int64 ``[B]``, the number of instances of each bag.
        offsets: packed layout: int64 ``[B+1]`` (bag b is rows ``offsets[b]:offsets[b+1]``);
            None in the padded layout.
        mask: padded layout: bool ``[B, N_max]`` valid mask; None in the packed layout.
        max_len: N_max, the longest bag, as a Python int: ``unpack(features, offsets,
            max_len=batch.max_len)`` pads a packed batch on the GPU without a host sync.
        fields: every other field of the samples, by dict key (dict samples) or by tuple position
            (tuple samples, from 2). Per-instance fields are collated like ``features`` (packed
            ``[T, ...]`` or padded ``[B, N_max, ...]``), per-bag fields like ``labels``. Also
            reachable as ``batch[key]``.

    ``batch.to(device, non_blocking=True)`` moves every tensor (dtypes unchanged);
    ``pin_memory()`` pins them, which is what ``DataLoader(pin_memory=True)`` calls.
    """

    features: Tensor
    labels: Any
    lengths: Tensor
    offsets: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    max_len: int = 0
    fields: Dict[Any, Any] = dataclasses.field(default_factory=dict)

    @property
    def layout(self) -> str:
        """``"packed"`` or ``"padded"``."""
        return "packed" if self.offsets is not None else "padded"

    @property
    def num_bags(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, key):
        return self.fields[key]

    def _apply(self, fn) -> "BagBatch":
        changes = {f.name: _map_tensors(getattr(self, f.name), fn) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "BagBatch":
        """Every tensor moved to ``device`` (labels and fields included); dtypes unchanged."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self, device=None) -> "BagBatch":
        """Every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._apply(lambda t: t.pin_memory() if device is None else t.pin_memory(device))

    def bag_index(self) -> Tensor:
        """Packed layout: the bag id of every row, int64 ``[T]`` (PyG's ``batch``), no host sync."""
        if self.offsets is None:
            raise ValueError("BagBatch.bag_index: only the packed layout has one row per instance")
        return batch_from_offsets(self.offsets, int(self.features.shape[0]))

    def padded(self):
        """Packed layout: ``(features [B, N_max, ...], mask [B, N_max])`` via ``unpack`` (differentiable,
        no host sync: ``max_len`` is known). Padded layout: ``(features, mask)`` as they are."""
        if self.offsets is None:
            return self.features, self.mask
        return unpack(self.features, self.offsets, max_len=self.max_len)


def _as_tensor(x, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
        np = None
    if np is not None and isinstance(x, np.ndarray):
        return torch.as_tensor(x)
    raise TypeError(f"collate_bags: {what} must be a tensor or numpy array [N_i, ...], got {type(x).__name__}")


def _is_array(x) -> bool:
    if isinstance(x, Tensor):
        return True
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _split_sample(sample, i: int, features_key, label_key):
    """-> (features, has_label, label, extras dict) for one sample."""
    if isinstance(sample, Mapping):
        if features_key not in sample:
            raise ValueError(
                f"collate_bags: samples[{i}] has no {features_key!r} key (keys {list(sample)}); "
                "set features_key to the key of the [N_i, D] tensor"
            )
        extras = {k: v for k, v in sample.items() if k != features_key and k != label_key}
        return sample[features_key], label_key in sample, sample.get(label_key), extras
    if isinstance(sample, (tuple, list)):
        if len(sample) == 0:
            raise ValueError(f"collate_bags: samples[{i}] is an empty {type(sample).__name__}")
        extras = {j: v for j, v in enumerate(sample) if j >= 2}
        return sample[0], len(sample) >= 2, (sample[1] if len(sample) >= 2 else None), extras
    return sample, False, None, {}


def _structure(sample) -> tuple:
    if isinstance(sample, Mapping):
        return ("dict", tuple(sorted(map(str, sample.keys()))))
    if isinstance(sample, (tuple, list)):
        return ("tuple", len(sample))
    return ("tensor",)


def _new_tensor(shape, dtype, device, fill=None) -> Tensor:
    # Inside a DataLoader worker the batch is sent to the main process through shared memory; writing
    # it there directly saves one copy of every batch (what default_collate does for its stacks).
    if get_worker_info() is not None and device.type == "cpu":
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            storage = torch.UntypedStorage._new_shared(nbytes)
            out = torch.empty((0,), dtype=dtype).set_(storage, 0, shape)
        except (AttributeError, RuntimeError):  # a torch without the private allocator: one more copy
            out = torch.empty(shape, dtype=dtype, device=device)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if fill is not None:
        out.fill_(fill)
    return out


def _collate_instances(name, values: List[Tensor], lengths: List[int], layout: str, padding_value) -> Tensor:
    first = values[0]
    trailing = tuple(first.shape[1:])
    for i, v in enumerate(values):
        if tuple(v.shape[1:]) != trailing:
            raise ValueError(
                f"collate_bags: {name} of samples[{i}] has shape {tuple(v.shape)}, expected "
                f"[N_i, *{trailing}] like samples[0]"
            )
        if v.dtype != first.dtype:
            raise ValueError(f"collate_bags: {name} of samples[{i}] is {v.dtype}, samples[0]'s is {first.dtype}")
        if v.device != first.device:
            raise ValueError(f"collate_bags: {name} of samples[{i}] is on {v.device}, samples[0]'s on {first.device}")
    if layout == "packed":
        out = _new_tensor((sum(lengths),) + trailing, first.dtype, first.device)
        return torch.cat(values, 0, out=out) if values else out
    n_max = max(lengths) if lengths else 0
    out = _new_tensor((len(values), n_max) + trailing, first.dtype, first.device, fill=padding_value)
    for b, v in enumerate(values):
        out[b, : v.shape[0]].copy_(v)
    return out


def _collate_per_bag(values: list):
    try:
        return default_collate(values)
    except (TypeError, RuntimeError, ValueError):
        # Values that do not stack (different shapes, None, arbitrary objects) stay a list.
        return list(values)


def collate_bags(
    samples: Sequence[Any],
    layout: str = "packed",
    *,
    instance_fields: Union[str, Sequence[Any]] = "auto",
    features_key: str = "features",
    label_key: str = "label",
    padding_value: Union[float, Mapping] = 0.0,
) -> BagBatch:
    """Collate a list of bags into one :class:`BagBatch` (use as ``DataLoader(collate_fn=...)``
    through :class:`BagCollator`, which carries the options).

    Args:
        samples: a list of bags. Each is a tensor / numpy array ``[N_i, D]`` (features only), a
            tuple ``(features, label, *extras)``, or a dict with ``features_key``, optionally
            ``label_key`` and any other keys. Every sample must have the same structure. Empty
            bags (``N_i = 0``, shape ``[0, D]``) are allowed.
        layout: ``"packed"``: ``features [T, D]`` + ``offsets [B+1]`` (no padding; for
            ``masked_attention_pool_packed``); ``"padded"``: ``features [B, N_max, D]`` + bool
            ``mask [B, N_max]`` (for ``masked_attention_pool``).
        instance_fields: which extra fields are per-instance (collated like the features, e.g.
            instance labels ``[N_i]`` or patch coordinates ``[N_i, 2]``); the others are per-bag
            (collated like the labels). ``"auto"``: a field is per-instance when, in every sample
            of the batch, it is a tensor / array whose first dimension is that bag's ``N_i``. Auto
            decides per batch, so name the fields (dict keys, or tuple positions from 2) when a
            per-bag tensor could happen to have ``N_i`` rows.
        features_key, label_key: the dict keys of the features and of the label.
        padding_value: the fill of padded positions (padded layout), for every per-instance field;
            or a dict ``{field: value}`` (the features' entry under ``features_key``; unnamed
            fields get 0), e.g. ``{"instance_label": -100}`` for ``cross_entropy``'s ignore index.

    Returns:
        :class:`BagBatch`. Features and per-instance fields keep their dtype (all samples must agree).

    Example::

        loader = DataLoader(dataset, batch_size=8, collate_fn=maskattn.data.BagCollator("padded"))
        for batch in loader:
            pooled, w = maskattn.masked_attention_pool(scores(batch.features), batch.features, batch.mask)
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"collate_bags: layout must be 'packed' or 'padded', got {layout!r}")
    if isinstance(samples, (Tensor, Mapping)) or not isinstance(samples, Sequence):
        raise TypeError(f"collate_bags: samples must be a list of bags, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("collate_bags: samples is empty; need at least one bag")
    struct = _structure(samples[0])
    feats, labels, extras, has_label = [], [], [], None
    for i, s in enumerate(samples):
        if _structure(s) != struct:
            raise ValueError(
                f"collate_bags: samples[{i}] is structured as {_structure(s)}, samples[0] as {struct}; "
                "every sample must have the same kind, length and keys"
            )
        f, has, lab, ex = _split_sample(s, i, features_key, label_key)
        f = _as_tensor(f, f"features of samples[{i}]")
        if f.dim() < 1:
            raise ValueError(f"collate_bags: features of samples[{i}] must be [N_i, ...], got shape {tuple(f.shape)}")
        feats.append(f)
        has_label = has if has_label is None else has_label
        labels.append(lab)
        extras.append(ex)
    lengths = [int(f.shape[0]) for f in feats]

    def pad_for(name):
        if isinstance(padding_value, Mapping):
            return padding_value.get(name, 0)
        return padding_value

    if isinstance(instance_fields, str):
        if instance_fields != "auto":
            raise ValueError(
                f"collate_bags: instance_fields must be 'auto' or a list of field names, got {instance_fields!r}"
            )
        names = [
            name
            for name in extras[0]
            if all(
                _is_array(ex[name]) and len(ex[name].shape) >= 1 and ex[name].shape[0] == n
                for ex, n in zip(extras, lengths)
            )
        ]
    else:
        names = list(instance_fields)
        for name in names:
            if name not in extras[0]:
                raise ValueError(
                    f"collate_bags: instance_fields names {name!r}, which the samples do not have "
                    f"(extra fields: {list(extras[0])})"
                )
    fields = {}
    for name in extras[0]:
        vals = [ex[name] for ex in extras]
        if name in names:
            tensors = []
            for i, (v, n) in enumerate(zip(vals, lengths)):
                v = _as_tensor(v, f"field {name!r} of samples[{i}]")
                if v.dim() < 1 or v.shape[0] != n:
                    raise ValueError(
                        f"collate_bags: per-instance field {name!r} of samples[{i}] must have N_i={n} rows, "
                        f"got shape {tuple(v.shape)}"
                    )
                tensors.append(v)
            fields[name] = _collate_instances(f"field {name!r}", tensors, lengths, layout, pad_for(name))
        else:
            fields[name] = _collate_per_bag(vals)

    features = _collate_instances("features", feats, lengths, layout, pad_for(features_key))
    device = feats[0].device
    len_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    max_len = max(lengths)
    out = BagBatch(
        features=features,
        labels=_collate_per_bag(labels) if has_label else None,
        lengths=len_t,
        max_len=max_len,
        fields=fields,
    )
    if layout == "packed":
        out.offsets = torch.cat([len_t.new_zeros(1), torch.cumsum(len_t, 0)])
    else:
        out.mask = torch.arange(max_len, device=device).unsqueeze(0) < len_t.unsqueeze(1)
    return out


class BagCollator:
    """``collate_fn`` object for ``DataLoader``: :func:`collate_bags` with fixed options (picklable,
    so it works with worker processes under any start method).

    Example::

        DataLoader(dataset, batch_sampler=sampler, collate_fn=BagCollator("padded", padding_value={"inst": -100}))
    """

    def __init__(
        self,
        layout: str = "packed",
        *,
        instance_fields: Union[str, Sequence[Any]] = "auto",
        features_key: str = "features",
        label_key: str = "label",
        padding_value: Union[float, Mapping] = 0.0,
    ):
        if layout not in _LAYOUTS:
            raise ValueError(f"BagCollator: layout must be 'packed' or 'padded', got {layout!r}")
        self.layout = layout
        self.instance_fields = instance_fields if isinstance(instance_fields, str) else tuple(instance_fields)
        self.features_key = features_key
        self.label_key = label_key
        self.padding_value = padding_value

    def __call__(self, samples: Sequence[Any]) -> BagBatch:
        return collate_bags(
            samples,
            self.layout,
            instance_fields=self.instance_fields,
            features_key=self.features_key,
            label_key=self.label_key,
            padding_value=self.padding_value,
        )

    def __repr__(self) -> str:
        return f"BagCollator(layout={self.layout!r}, instance_fields={self.instance_fields!r})"


# ---------------------------------------------------------------------------------------------
# Batch sampler


def _sizes_list(sizes) -> List[int]:
    if isinstance(sizes, Tensor):
        if sizes.dim() != 1 or sizes.dtype.is_floating_point or sizes.dtype.is_complex:
            raise ValueError(
                f"BagBatchSampler: sizes must be a 1-D integer sequence, got {sizes.dtype} shape {tuple(sizes.shape)}"
            )
        out = sizes.tolist()
    else:
        try:
            out = [int(s) for s in sizes]
        except (TypeError, ValueError) as e:
            raise ValueError(f"BagBatchSampler: sizes must be a sequence of ints (instances per bag): {e}") from None
        for i, (s, raw) in enumerate(zip(out, sizes)):
            if s != raw:
                raise ValueError(f"BagBatchSampler: sizes[{i}] = {raw!r} is not an integer")
    for i, s in enumerate(out):
        if s < 0:
            raise ValueError(f"BagBatchSampler: sizes[{i}] = {s} is negative")
    return out


def _positive_int(name: str, v, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"BagBatchSampler: {name} must be an int >= 1, got {v!r}")


class BagBatchSampler(Sampler[List[int]]):
    """Batches of bag indices under an instance budget, bucketed by size, shuffled per epoch and
    split across distributed ranks. Use as ``DataLoader(dataset, batch_sampler=...)``.

    Args:
        sizes: the number of instances of every bag of the dataset (``len(sizes) == len(dataset)``).
        max_instances: the budget of a batch: the total number of instances (``budget="instances"``,
            the packed layout's ``T``) or ``B * N_max`` (``budget="padded"``, the padded layout's
            features tensor). A bag larger than the budget on its own forms a batch by itself (it
            is never dropped or split: chunk such bags in the model).
        shuffle: a new order every epoch (``seed + epoch``, as ``DistributedSampler``); without
            it, batches follow the dataset order (within each size bucket when ``bucket``).
        seed: the base of the per-epoch generator; every rank must use the same.
        drop_last: drop the final, partly filled batch of the epoch (at most one batch: the one
            closed because the bags ran out rather than by the budget; the partly filled ends
            of the buckets are first batched together, in size order) and, when distributed,
            drop the last batches so that every rank gets the same number instead of repeating
            some (see below).
        num_replicas, rank: distributed training; default to the world size and rank of the
            initialised default process group (1 and 0 without one).
        bucket: group bags of similar size into the same batches (little padding in the padded
            layout). Bag sizes fall into geometric buckets ``[r^j, r^(j+1))`` with
            ``r = bucket_ratio`` (empty bags form their own); each epoch the bags of a bucket
            are shuffled and batched together, and the batches of all buckets are shuffled
            together. The packed layout has no padding: ``bucket=False`` there mixes bag sizes
            freely within a batch.
        bucket_ratio: r above, > 1. Within a bucket the longest bag is less than r times the
            shortest, so a padded batch formed in one bucket is less than ``1 - 1/r`` padding
            (a third for the default 1.5); only the batches of the buckets' leftovers (see drop_last) mix
            buckets. Smaller r, less padding and less mixing.
        max_bags: optional cap on the number of bags per batch.
        budget: ``"instances"`` (sum of sizes) or ``"padded"`` (bags x longest bag).

    Every epoch, each bag is in exactly one batch (single process, ``drop_last=False``).
    Distributed: all ranks compute the same batch list from ``seed + epoch`` and rank r takes
    batches ``r, r + num_replicas, ...``; the list is first padded with batches from its start
    (as ``DistributedSampler`` pads indices) so every rank gets the same number of batches, and
    then a few bags are seen twice in that epoch; with ``drop_last`` the list is cut instead. So
    ranks are disjoint except for the repeated batches. ``len()`` is exact for the current epoch
    (the number of batches depends on the order, so it may change from epoch to epoch; it is the
    same on every rank). Call :meth:`set_epoch` before each epoch.

    Example::

        sampler = BagBatchSampler(sizes, max_instances=50_000, budget="padded", seed=0)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=BagCollator("padded"), num_workers=4)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for batch in loader: ...
    """

    def __init__(
        self,
        sizes: Sequence[int],
        max_instances: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        bucket: bool = True,
        *,
        bucket_ratio: float = 1.5,
        max_bags: Optional[int] = None,
        budget: str = "instances",
    ):
        self.sizes = _sizes_list(sizes)
        _positive_int("max_instances", max_instances)
        if isinstance(bucket_ratio, bool) or not isinstance(bucket_ratio, (int, float)) or not bucket_ratio > 1:
            raise ValueError(f"BagBatchSampler: bucket_ratio must be a number > 1, got {bucket_ratio!r}")
        _positive_int("max_bags", max_bags, allow_none=True)
        if budget not in ("instances", "padded"):
            raise ValueError(f"BagBatchSampler: budget must be 'instances' or 'padded', got {budget!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"BagBatchSampler: seed must be an int, got {seed!r}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if initialised else 1
            if rank is None:
                rank = dist.get_rank() if initialised else 0
        _positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"BagBatchSampler: rank must be an int in [0, num_replicas={num_replicas}), got {rank!r}")
        self.max_instances = max_instances
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket = bool(bucket)
        self.bucket_ratio = float(bucket_ratio)
        self.max_bags = max_bags
        self.budget = budget
        self.epoch = 0
        self._cache = None
        # Geometric buckets bound the size ratio inside a bucket whatever the size distribution
        # (quantile buckets do not: the top one spans the whole tail). Fixed for the dataset,
        # members in index order, buckets in size order.
        if self.bucket:
            log_r = math.log(self.bucket_ratio)
            groups: Dict[int, List[int]] = {}
            for i, s in enumerate(self.sizes):
                groups.setdefault(-1 if s == 0 else math.floor(math.log(s) / log_r), []).append(i)
            self._buckets = [groups[key] for key in sorted(groups)]
        else:
            self._buckets = [list(range(len(self.sizes)))]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order :meth:`__iter__` and ``len()`` give (``seed + epoch`` seeds it)."""
        self.epoch = int(epoch)

    def _fits(self, count: int, total: int, longest: int, size: int) -> bool:
        if self.max_bags is not None and count + 1 > self.max_bags:
            return False
        if self.budget == "instances":
            return total + size <= self.max_instances
        return (count + 1) * max(longest, size) <= self.max_instances

    def _greedy(self, order: List[int]):
        """Batches closed by the budget, and the leftover (the last, unclosed one)."""
        full, cur, total, longest = [], [], 0, 0
        for i in order:
            s = self.sizes[i]
            if cur and not self._fits(len(cur), total, longest, s):
                full.append(cur)
                cur, total, longest = [], 0, 0
            cur.append(i)
            total += s
            longest = max(longest, s)
        return full, cur

    def _global_batches(self, epoch: int) -> List[List[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        batches, leftovers = [], []
        for members in self._buckets:
            if self.shuffle and len(members) > 1:
                members = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            full, rest = self._greedy(members)
            batches.extend(full)
            leftovers.extend(rest)
        # The buckets' leftovers (sizes adjacent bucket to bucket) share batches, so at most one
        # batch per epoch is partly filled.
        full, rest = self._greedy(leftovers)
        batches.extend(full)
        if rest and not self.drop_last:
            batches.append(rest)
        if self.shuffle and len(batches) > 1:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _rank_batches(self, epoch: int) -> List[List[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        batches = self._global_batches(epoch)
        r = self.num_replicas
        if r > 1 and len(batches) % r:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % r]
            else:
                need = r - len(batches) % r
                batches = batches + [batches[j % len(batches)] for j in range(need)]
        mine = batches[self.rank :: r]
        self._cache = (epoch, mine)
        return mine

    def __iter__(self) -> Iterator[List[int]]:
        for b in self._rank_batches(self.epoch):
            yield list(b)

    def __len__(self) -> int:
        return len(self._rank_batches(self.epoch))

    def padding_fraction(self, epoch: Optional[int] = None) -> float:
        """The fraction of a padded layout's features tensor that is padding, over this rank's
        batches of ``epoch`` (default: the current one): ``1 - sum(N_i) / sum(B * N_max)``."""
        batches = self._rank_batches(self.epoch if epoch is None else int(epoch))
        slots = sum(len(b) * max(self.sizes[i] for i in b) for b in batches)
        used = sum(self.sizes[i] for b in batches for i in b)
        return 1.0 - used / slots if slots else 0.0

    def __repr__(self) -> str:
        return (
            f"BagBatchSampler(bags={len(self.sizes)}, max_instances={self.max_instances}, budget={self.budget!r}, "
            f"bucket={self.bucket}, bucket_ratio={self.bucket_ratio}, shuffle={self.shuffle}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )
