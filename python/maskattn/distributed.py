"""One bag split across the ranks of a process group, pooled exactly.

Each rank pools its own rows into a partial state ``(pooled, lse)``
(:func:`maskattn.attention_pool_partial`, or :func:`maskattn.chunked_attention_pool` with
``return_lse=True``); :func:`merge_across_ranks` gathers the states of every rank and merges them
by log-sum-exp, so that every rank holds the pooled vector of the whole bag, with gradients that
flow back to each rank's own rows.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._chunked import attention_pool_merge

_GRADS = ("sum", "mean")


class _GatherStates(torch.autograd.Function):
    """all_gather of (pooled, lse) in one collective; the backward all-reduces the gradients of the
    gathered copies and hands each rank the slice of its own state."""

    @staticmethod
    def forward(ctx, pooled: Tensor, lse: Tensor, group, grads: str):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        dtype = torch.promote_types(pooled.dtype, lse.dtype)
        # One flat buffer per rank: a single collective each way, so the ranks cannot pair up two
        # collectives in different orders.
        flat = torch.cat([pooled.reshape(-1).to(dtype), lse.reshape(-1).to(dtype)])
        bufs = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(bufs, flat, group=group)
        stacked = torch.stack(bufs)
        n = pooled.numel()
        ctx.meta = (group, grads, world, pooled.shape, pooled.dtype, lse.shape, lse.dtype, dtype, n, flat.device)
        return (
            stacked[:, :n].reshape((world,) + tuple(pooled.shape)).to(pooled.dtype),
            stacked[:, n:].reshape((world,) + tuple(lse.shape)).to(lse.dtype),
        )

    @staticmethod
    def backward(ctx, grad_pooled: Optional[Tensor], grad_lse: Optional[Tensor]):
        import torch.distributed as dist

        group, grads, world, p_shape, p_dtype, l_shape, l_dtype, dtype, n, device = ctx.meta
        gp = grad_pooled if grad_pooled is not None else torch.zeros((world,) + tuple(p_shape), device=device)
        gl = grad_lse if grad_lse is not None else torch.zeros((world,) + tuple(l_shape), device=device)
        flat = torch.cat([gp.reshape(world, -1).to(dtype), gl.reshape(world, -1).to(dtype)], 1).contiguous()
        dist.all_reduce(flat, group=group)
        if grads == "mean":
            flat = flat / world
        mine = flat[dist.get_rank(group)]
        return mine[:n].reshape(p_shape).to(p_dtype), mine[n:].reshape(l_shape).to(l_dtype), None, None


def merge_across_ranks(pooled: Tensor, lse: Tensor, group=None, grads: str = "sum") -> Tuple[Tensor, Tensor]:
    """Merge every rank's partial state of the same bags: the exact pooled result on every rank.

    Args:
        pooled: this rank's partial pooled vectors, ``[B, D]`` / ``[B, K, D]`` or one bag's ``[D]`` /
            ``[K, D]`` (the same shape and
            dtype on every rank; a rank with no rows of a bag passes zeros and ``lse = -inf``, which
            ``attention_pool_partial`` gives for an empty share).
        lse: this rank's log-sum-exps, ``pooled``'s shape without the last axis.
        group: the process group (default: the world).
        grads: what each rank's ``(pooled, lse)`` receives in the backward, from the gradients that
            reach the gathered copies on all ranks:

            - ``"sum"`` (the rule of ``torch.distributed.nn.functional.all_gather``): their sum. Each
              rank then holds the gradient of the sum of all ranks' losses. When every rank
              computes the same loss from the merged result, DDP's averaging of parameter
              gradients yields exactly the one-process gradients, for the scoring network below the
              merge as for a head above it; gradients DDP does not average (features that require
              grad) are ``world_size`` times the one-process ones.
            - ``"mean"``: their mean. With the same loss on every rank, each rank's share gets
              exactly the one-process gradient (features included); the scoring network's
              parameter gradients are then each rank's part of the sum, to add up with an
              all-reduce SUM (not DDP's average); a replicated head above the merge would be
              counted ``world_size`` times by that sum.

    Returns:
        ``(pooled, lse)`` of the whole bag, the same on every rank (merged in rank order, so
        bitwise equal everywhere). Every rank must run the backward through it (it all-reduces).
    """
    import torch.distributed as dist

    if grads not in _GRADS:
        raise ValueError(f"merge_across_ranks: grads must be one of {_GRADS}, got {grads!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("merge_across_ranks: torch.distributed is not initialised (init_process_group first)")
    if pooled.dim() < 1 or tuple(pooled.shape[:-1]) != tuple(lse.shape):
        raise ValueError(
            f"merge_across_ranks: pooled must be [B, (K,) D] and lse [B, (K,)] (or one bag's [D] and []), "
            f"got {tuple(pooled.shape)} and {tuple(lse.shape)}"
        )
    stacked_pooled, stacked_lse = _GatherStates.apply(pooled, lse, group, grads)
    return attention_pool_merge(stacked_pooled, stacked_lse, dim=0)
