"""Where the valid tokens of a padded ``[B, N]`` batch sit once packed back to back, and the
per-thread record of the block stack that :class:`maskattn.nn.PackedBlocks` is running.

A :class:`PackedLayout` is built once per padded batch (one host sync on CUDA: the packed size
decides tensor shapes) and is then shared by every layer that runs on the packed tokens: the
attention reads the segment boundaries (``cu_seqlens``, ``lengths``) to attend within each sample,
and each token's original position (``positions``) to pick its rotary-embedding row.
"""

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor


class PackedLayout:
    """The packing of a bool valid mask ``[B, N]``: tokens in row-major order, sample by sample.

    Attributes: ``batch`` (B), ``seq_len`` (N), ``total`` (T, the valid tokens), ``lengths``
    (host list of the B sample lengths), ``max_len``, ``valid`` (the bool mask), ``index`` (int64
    ``[T]``: flat ``b * N + n`` of each packed token), ``batch_index`` and ``positions`` (``b`` and
    ``n``, int64 ``[T]``), ``cu_seqlens`` (int32 ``[B + 1]`` on the mask's device, built on first use).
    """

    def __init__(self, valid: Tensor, lengths: Optional[Tensor] = None, host_lengths: Optional[List[int]] = None):
        """``lengths`` (``valid.sum(1)``) and its host copy ``host_lengths`` when the caller has them."""
        if valid.dim() != 2 or valid.dtype != torch.bool:
            raise ValueError(f"PackedLayout: valid must be a bool [B, N] mask, got {valid.dtype} {tuple(valid.shape)}")
        self.valid = valid
        self.batch, self.seq_len = valid.shape
        self._lengths_dev = valid.sum(1) if lengths is None else lengths
        # the one host sync: T sizes every tensor
        self.lengths: List[int] = self._lengths_dev.tolist() if host_lengths is None else host_lengths
        self.total = sum(self.lengths)
        self.max_len = max(self.lengths, default=0)
        flat = valid.reshape(-1)
        if flat.is_cuda:  # the size is known: no second sync
            self.index = torch.nonzero_static(flat, size=self.total).squeeze(1)
        else:
            self.index = flat.nonzero().squeeze(1)
        self.batch_index = torch.div(self.index, self.seq_len, rounding_mode="floor") if self.seq_len else self.index
        self.positions = self.index - self.batch_index * self.seq_len
        self._cu_seqlens: Optional[Tensor] = None

    @property
    def padded(self) -> bool:
        """Whether any token is padding."""
        return self.total != self.batch * self.seq_len

    @property
    def cu_seqlens(self) -> Tensor:
        if self._cu_seqlens is None:
            cu = torch.zeros(self.batch + 1, dtype=torch.int32, device=self.valid.device)
            cu[1:] = torch.cumsum(self._lengths_dev, 0).to(torch.int32)
            self._cu_seqlens = cu
        return self._cu_seqlens

    def pack(self, x: Tensor) -> Tensor:
        """``[B, N, ...]`` -> ``[T, ...]`` (differentiable; any strides, without a padded-size copy)."""
        if x.is_contiguous():
            return x.reshape(self.batch * self.seq_len, *x.shape[2:]).index_select(0, self.index)
        return x[self.batch_index, self.positions]

    def unpack(self, t: Tensor) -> Tensor:
        """``[T, ...]`` -> ``[B, N, ...]`` with zeros at padding (differentiable)."""
        out = t.new_zeros((self.batch * self.seq_len, *t.shape[1:]))
        return out.index_copy(0, self.index, t).view(self.batch, self.seq_len, *t.shape[1:])

    def per_token(self, t: Tensor) -> Tensor:
        """A per-sample ``[B, ...]`` tensor repeated for each packed token: ``[T, ...]``."""
        return t.index_select(0, self.batch_index)


class _Active(threading.local):
    # What PackedBlocks is running on this thread: the layout of its packed tokens, or the mask of
    # its padded batch. A thread-local (not a context variable) because torch.compile traces
    # reading it, with a guard, without breaking the graph. ``backward`` holds (graph task id,
    # layout) for packed stacks whose backward is running on this thread: activation
    # checkpointing inside the blocks recomputes their forward there, outside packed_forward.
    def __init__(self):
        self.layout: Optional[PackedLayout] = None
        self.mask: Optional[Tensor] = None
        self.backward: List[Tuple[int, PackedLayout]] = []


_ACTIVE = _Active()
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _matches(layout: PackedLayout, x: Tensor) -> bool:
    return x.dim() == 3 and x.shape[0] == layout.total and x.shape[1] == 1


def active_layout(x: Tensor) -> Optional[PackedLayout]:
    """The layout of the packed block stack being run, when ``x`` is its ``[T, 1, C]`` tokens."""
    layout = _ACTIVE.layout
    if layout is not None:
        return layout if _matches(layout, x) else None
    if _ACTIVE.backward:  # a forward recomputed during the backward of a packed stack
        task = _graph_task_id()
        for t, lay in reversed(_ACTIVE.backward):
            if t == task and _matches(lay, x):
                return lay
    return None


def keep_active_in_backward(out: Tensor, inp: Tensor, layout: PackedLayout) -> None:
    """Make ``layout`` active again while the backward runs from the packed output ``out`` back to
    the packed input ``inp`` (both ``[T, 1, ...]``), for forwards recomputed there (activation
    checkpointing inside the blocks). Entries are tied to the backward's graph task, so one left
    behind by a backward that never reached ``inp`` can match nothing later."""
    if _graph_task_id is None or not (torch.is_grad_enabled() and out.requires_grad and inp.requires_grad):
        return

    def enter(grad):
        task = _graph_task_id()
        _ACTIVE.backward = [e for e in _ACTIVE.backward if e[0] == task] + [(task, layout)]

    def leave(grad):
        _ACTIVE.backward = [e for e in _ACTIVE.backward if e[1] is not layout]

    out.register_hook(enter)
    inp.register_hook(leave)


def active_mask(x: Tensor) -> Optional[Tensor]:
    """The ``[B, N]`` valid mask of the padded block stack being run, when ``x`` is ``[B, N, C]``."""
    mask = _ACTIVE.mask
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return mask
    return None
