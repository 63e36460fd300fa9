"""A stack of transformer blocks run on the valid tokens of a padded batch only.

The tokens of all samples are packed once (``[T, 1, C]``: T valid tokens, each a "sample" of one
token to the block's token-wise layers), every block runs unmodified on them - norms, modulation,
projections and MLP touch valid tokens only, and :class:`MaskedSelfAttention` attends within each
sample's segment - and the result is unpacked at the end with zeros at padding.
"""

from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._packed_layout import _ACTIVE, PackedLayout, keep_active_in_backward
from .masked_self_attention import MaskedSelfAttention


def _check_blocks(blocks: List[Callable]) -> None:
    modules = [b for b in blocks if isinstance(b, nn.Module)]
    if modules and not any(isinstance(m, MaskedSelfAttention) for b in modules for m in b.modules()):
        raise ValueError(
            "packed_forward: the blocks hold no maskattn.nn.MaskedSelfAttention; another attention would "
            "see every packed token on its own (or ignore the padding). Replace the blocks' attention "
            "with MaskedSelfAttention (its state dict loads unchanged)"
        )


def _valid(x: Tensor, mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"packed_forward: mask must be a Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"packed_forward: mask must be a real or bool tensor (nonzero = valid), got {mask.dtype}")
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"packed_forward: mask must be [B, N] = {list(x.shape[:2])} to match x {tuple(x.shape)}, "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"packed_forward: mask ({mask.device}) and x ({x.device}) must be on the same device")
    return mask if mask.dtype == torch.bool else mask != 0


def _run(blocks, x, args, kwargs):
    for block in blocks:
        x = block(x, *args, **kwargs)
    return x


class _PerSampleHooks:
    """Runs a module whose input is a per-token expansion of a per-sample argument (JiT's
    ``adaLN_modulation(c)``) on the per-sample rows instead, and expands its output: B rows of
    work instead of T. Exact for modules that act on each row alone (Linear, activations, a
    Sequential of them)."""

    def __init__(self, blocks: List[Callable], expanded: List[Tuple[Tensor, Tensor]], layout: PackedLayout):
        self.expanded, self.layout = expanded, layout
        self.swapped: List[bool] = []
        self.handles = []
        for block in blocks:
            if not isinstance(block, nn.Module):
                continue
            for m in block.modules():
                if m is block:
                    continue
                # first in, last out: the module's own hooks see the rows it really computes on
                self.handles.append(m.register_forward_pre_hook(self._pre, prepend=True))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        if args:
            for tok, per_sample in self.expanded:
                if args[0] is tok:
                    self.swapped.append(True)
                    return (per_sample, *args[1:])
        self.swapped.append(False)
        return None

    def _post(self, module, args, out):
        if self.swapped.pop():
            return self._expand(out, module)
        return None

    def _expand(self, out, module):
        if isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == self.layout.batch:
            return self.layout.per_token(out)
        if isinstance(out, (tuple, list)):
            return type(out)(self._expand(o, module) for o in out)
        raise TypeError(
            f"packed_forward: {type(module).__name__} was run once per sample on a per-sample argument and "
            f"returned {type(out).__name__} without the batch dimension {self.layout.batch} first; pass "
            "run_per_sample=False to run it on every token instead"
        )

    def remove(self):
        for h in self.handles:
            h.remove()


def packed_forward(
    blocks: Iterable[Callable],
    x: Tensor,
    mask: Optional[Tensor],
    *args: Any,
    pack: Optional[bool] = None,
    run_per_sample: bool = True,
    **kwargs: Any,
) -> Tensor:
    """``for block in blocks: x = block(x, *args, **kwargs)`` over a padded batch, on valid tokens only.

    Args:
        blocks: the block stack (modules or callables), each called as ``block(x, *args, **kwargs)``
            and returning the new tokens. Their attention must be :class:`MaskedSelfAttention`; every
            other layer must act on each token alone (norms, modulation, projections, MLP).
        x: ``[B, N, C]`` tokens.
        mask: ``[B, N]`` valid mask (nonzero = valid, any dtype) or None (no padding: the plain loop).
        args, kwargs: the blocks' other arguments. A tensor whose first two dims are ``[B, N]`` is
            per token (packed with ``x``); any other tensor whose first dim is B is per sample
            (repeated for each of its tokens, e.g. JiT's condition ``c`` [B, C]); everything else
            (JiT's rope module, a ``(cos, sin)`` pair, flags) passes unchanged.
        pack: None = pack (eager) / padded route (under ``torch.compile`` or CUDA graph capture);
            True = pack; False = the padded route: the blocks run on ``[B, N, C]`` and the attention
            takes the mask from here (no host sync, CUDA-graph safe; padding costs full price).
        run_per_sample: modules of the blocks called directly on a per-sample argument (JiT's
            ``adaLN_modulation(c)``) run on its B rows and their output is repeated per token,
            instead of running on T rows; exact for row-wise modules (Linear, activations, a
            Sequential of them). False runs them per token.

    Returns ``[B, N, C_out]`` with exactly 0 at padding (the last block's output).

    In the packed route the attention reads the layout (segment boundaries, each token's position
    for the rope) from a per-thread record this function keeps while the blocks run; the blocks
    get ``x`` as ``[T, 1, C]`` and per-sample tensors as ``[T, ...]``, so ``x * (1 +
    scale.unsqueeze(1))`` modulation broadcasts as in the padded batch. Packing reads the sample
    lengths back (one host sync on CUDA; none on CPU); a batch that turns out to have no padding
    then takes the plain loop with no mask at all. ``mask=None`` and ``pack=False`` never sync. The
    packed route graph-breaks under ``torch.compile`` (the packed size is data-dependent), which is
    why compiling picks the padded route.

    Activation checkpointing: the layout stays active while the stack's backward runs (when ``x``
    requires grad), so blocks checkpointed inside the stack recompute the same attention. With
    ``torch.utils.checkpoint(use_reentrant=False)`` inside, pass ``run_per_sample=False``: the
    recomputation runs without the per-sample shortcut, which that checkpoint refuses
    (``CheckpointError``). Checkpointing the whole ``PackedBlocks`` call works in every mode.
    """
    blocks = list(blocks)
    if not isinstance(x, Tensor) or x.dim() < 3:
        raise ValueError(
            f"packed_forward: x must be a [B, N, C] tensor, got {tuple(x.shape) if isinstance(x, Tensor) else x!r}"
        )
    if mask is None:
        return _run(blocks, x, args, kwargs)
    valid = _valid(x, mask)
    _check_blocks(blocks)
    if pack is None:
        pack = not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
    if not pack:
        # Zeroed on entry: padded rows still run through the token-wise layers here, and inf / NaN
        # stored there would reach the parameter gradients (0 * NaN) though never an output.
        x = torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 2))), x, x.new_zeros(()))
        previous = _ACTIVE.mask
        _ACTIVE.mask = valid
        try:
            out = _run(blocks, x, args, kwargs)
        finally:
            _ACTIVE.mask = previous
        return torch.where(valid.view(*valid.shape, *([1] * (out.dim() - 2))), out, out.new_zeros(()))

    B, N = valid.shape
    lengths = valid.sum(1)
    host_lengths = lengths.tolist()  # the one host sync on CUDA: the packed size
    if sum(host_lengths) == B * N:  # no padding: the plain loop, nothing packed
        return _run(blocks, x, args, kwargs)
    layout = PackedLayout(valid, lengths, host_lengths)
    expanded: List[Tuple[Tensor, Tensor]] = []

    def to_tokens(a):
        if not isinstance(a, Tensor):
            return a
        if a.dim() >= 2 and a.shape[:2] == (B, N):
            return layout.pack(a).unsqueeze(1)
        if a.dim() >= 1 and a.shape[0] == B:
            tok = layout.per_token(a)
            expanded.append((tok, a))
            return tok
        return a

    targs = tuple(to_tokens(a) for a in args)
    tkwargs = {k: to_tokens(v) for k, v in kwargs.items()}
    h0 = layout.pack(x).unsqueeze(1)
    h = h0
    hooks = _PerSampleHooks(blocks, expanded, layout) if run_per_sample and expanded else None
    previous = (_ACTIVE.layout, _ACTIVE.mask)
    _ACTIVE.layout, _ACTIVE.mask = layout, None
    try:
        h = _run(blocks, h, targs, tkwargs)
    finally:
        _ACTIVE.layout, _ACTIVE.mask = previous
        if hooks is not None:
            hooks.remove()
    if not isinstance(h, Tensor) or h.dim() < 2 or h.shape[:2] != (layout.total, 1):
        raise ValueError(
            f"packed_forward: the blocks must return the packed tokens [T, 1, C] = [{layout.total}, 1, ...], got "
            f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}"
        )
    keep_active_in_backward(h, h0, layout)
    return layout.unpack(h.squeeze(1))


class PackedBlocks(nn.ModuleList):
    """A block list whose call runs the stack on valid tokens only: ``blocks(x, mask, *args, **kwargs)``.

    A drop-in for the ``nn.ModuleList`` of blocks: same state-dict keys (``blocks.3.attn.qkv.weight``),
    indexing, iteration and slicing (a slice keeps the settings), so a model's loop
    ``for blk in self.blocks: x = blk(x, c, rope)`` becomes ``x = self.blocks(x, mask, c, rope)``
    (and ``self.blocks[:s](...)`` / ``self.blocks[s:](...)`` around JiT's in-context tokens).
    See :func:`packed_forward` for ``pack`` and ``run_per_sample`` (attributes, settable later).
    """

    def __init__(
        self, blocks: Optional[Iterable[nn.Module]] = None, pack: Optional[bool] = None, run_per_sample: bool = True
    ):
        super().__init__(blocks)
        self.pack = pack
        self.run_per_sample = run_per_sample

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return PackedBlocks(list(self._modules.values())[idx], pack=self.pack, run_per_sample=self.run_per_sample)
        return super().__getitem__(idx)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *args: Any, **kwargs: Any) -> Tensor:
        return packed_forward(self, x, mask, *args, pack=self.pack, run_per_sample=self.run_per_sample, **kwargs)

    def extra_repr(self) -> str:
        return f"pack={self.pack}, run_per_sample={self.run_per_sample}"
