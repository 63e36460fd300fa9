"""Bridges between lists of variable-length sequences, padded batches and packed (ragged) rows.

These are index shuffles, not kernels: they are written with differentiable torch ops so that
gradients flow through pack/unpack and torch.compile sees through them.
"""

import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_batchedtensor

from . import _validation as _v


def _not_vmapped(t: Tensor, what: str, why: str) -> None:
    if is_batchedtensor(t):
        raise RuntimeError(
            f"maskattn.{what} cannot be vmapped: {why}, which torch.vmap cannot batch. vmap over the "
            "features only (one mask / offsets shared by the examples), or call it outside torch.vmap"
        )


def pad_sequences(seqs: Sequence[Tensor], padding_value: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Stack ``[N_i, ...]`` tensors into ``[B, N_max, ...]`` plus a bool valid mask ``[B, N_max]``.

    The drop-in for ``pad_patches_batch`` in MIL training loops.
    """
    if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__len__"):
        raise TypeError(f"pad_sequences: seqs must be a list of [N_i, ...] tensors, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError("pad_sequences: seqs is empty; need at least one [N_i, ...] tensor")
    if isinstance(padding_value, bool) or not isinstance(padding_value, numbers.Number):
        raise TypeError(f"pad_sequences: padding_value must be a number, got {padding_value!r}")
    for i, s in enumerate(seqs):
        _v.check_tensor(s, "pad_sequences", f"seqs[{i}]")
    trailing = seqs[0].shape[1:]
    for i, s in enumerate(seqs):
        if s.dtype != seqs[0].dtype or s.device != seqs[0].device:
            raise ValueError(
                f"pad_sequences: seqs[{i}] is {s.dtype} on {s.device}, but seqs[0] is {seqs[0].dtype} on "
                f"{seqs[0].device}; every tensor must have one dtype and device"
            )
        if s.dim() < 1 or s.shape[1:] != trailing:
            raise ValueError(
                f"pad_sequences: seqs[{i}] has shape {tuple(s.shape)}, expected [N_i, *{tuple(trailing)}] like seqs[0]"
            )
    lengths = torch.tensor([s.shape[0] for s in seqs], device=seqs[0].device)
    if torch._C._are_functorch_transforms_active():
        # pad_sequence has no batching rule (torch.vmap); pad + stack has, and the same derivatives
        n_max = max(s.shape[0] for s in seqs)
        padded = torch.stack(
            [F.pad(s, (0, 0) * (s.dim() - 1) + (0, n_max - s.shape[0]), value=padding_value) for s in seqs]
        )
    else:
        padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=padding_value)
        n_max = padded.shape[1]
    mask = torch.arange(n_max, device=padded.device).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


def _offsets_from_lengths(lengths: Tensor) -> Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int64)


def pack(padded: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``[B, N, ...]`` + valid mask ``[B, N]`` -> packed rows ``[T, ...]`` and int64 offsets ``[B+1]``.

    Valid rows keep their order within each bag; padding anywhere (not only at the end) is dropped.
    Differentiable in ``padded`` (torch.func too, and torch.vmap over ``padded``; a vmapped mask
    raises). T depends on the mask's values, so on CUDA this syncs once.
    """
    _v.check_tensor(padded, "pack", "padded")
    _v.check_mask(mask, "pack", "mask")
    if padded.dim() < 2:
        raise ValueError(f"pack: padded must be [B, N, ...], got shape {tuple(padded.shape)}")
    if mask.shape != padded.shape[:2]:
        raise ValueError(f"pack: mask must be [B, N] = {list(padded.shape[:2])}, got shape {tuple(mask.shape)}")
    if mask.device != padded.device:
        raise ValueError(f"pack: mask ({mask.device}) and padded ({padded.device}) must be on the same device")
    _not_vmapped(mask, "pack's mask", "each example would keep a different number of rows")
    valid = _v.valid_mask(mask, "pack")
    packed = padded[valid]
    return packed, _offsets_from_lengths(valid.sum(1))


def unpack(packed: Tensor, offsets: Tensor, max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Packed rows ``[T, ...]`` + offsets ``[B+1]`` -> ``([B, max_len, ...], bool mask [B, max_len])``.

    Bags are left-aligned; rows past ``max_len`` raise. ``max_len=None`` uses the longest bag (one
    host sync on CUDA; pass it to avoid that). Differentiable in ``packed`` (torch.func too, and
    torch.vmap over ``packed``; vmapped offsets raise).
    """
    _v.check_tensor(packed, "unpack", "packed")
    _v.check_tensor(offsets, "unpack", "offsets")
    if packed.dim() < 1:
        raise ValueError(f"unpack: packed must be [T, ...], got shape {tuple(packed.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"unpack: offsets must be an int64 [B+1] tensor, got {offsets.dtype} shape {tuple(offsets.shape)}"
        )
    _not_vmapped(offsets, "unpack's offsets", "each example would place its rows by data-dependent indices")
    offsets = offsets.to(device=packed.device, dtype=torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    batch, total = lengths.shape[0], packed.shape[0]
    if max_len is None:
        max_len = int(lengths.max().item()) if batch > 0 else 0
    else:
        max_len = _v.as_int(max_len, "unpack", "max_len", min_value=0)
    # Checked where reading the offsets is free (CPU, eager); a compiled graph cannot branch on them.
    if not packed.is_cuda and not torch.compiler.is_compiling():
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != total or any(b < a for a, b in zip(o, o[1:])):
            raise ValueError(
                f"unpack: offsets must rise from 0 to T={total}, got {o if len(o) <= 16 else o[:16] + ['...']}"
            )
        if batch and max(b - a for a, b in zip(o, o[1:])) > max_len:
            raise ValueError(f"unpack: a bag is longer than max_len={max_len}")
    bag = torch.repeat_interleave(torch.arange(batch, device=packed.device), lengths, output_size=total)
    pos = torch.arange(total, device=packed.device) - offsets[bag]
    out = packed.new_zeros((batch, max_len) + tuple(packed.shape[1:]))
    out = out.index_put((bag, pos), packed)
    mask = torch.arange(max_len, device=packed.device).unsqueeze(0) < lengths.unsqueeze(1)
    return out, mask
