"""Every public function rejects bad input with an error that names the argument.

The cases live in one list, CASES; docs/errors.md holds a table generated from it, and
test_docs_table_matches_cases checks that the two agree. Regenerate the table after changing the
cases with:

    python tests/test_errors.py --write-docs
"""

import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Type

import pytest
import torch

import maskattn
import maskattn.nn as mnn
from maskattn import losses, masks, optim, transforms

F32, F64, I64 = torch.float32, torch.float64, torch.int64
# A complex mask raises an error that is both: TypeError (wrong kind of tensor) and RuntimeError (what
# the ops' C++ checks raise); test_mask_rule.py checks both bases.
MASK_DTYPE = (TypeError, RuntimeError)
from conftest import HAS_CUDA  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "errors.md")
_OPS = torch.ops.maskattn


@dataclass
class Case:
    func: str  # the public name, as users call it
    kind: str  # rank | shape | dtype | device | offsets | size | value | type (wrong kind of object)
    bad: str  # what is wrong, in words (goes into the docs table)
    call: Callable[[], object]
    exc: Type[BaseException]
    match: str  # regex the message must contain; it names the argument
    cuda: bool = False  # needs a CUDA device (mixed-device cases)


def r(*shape, dtype=F32, device="cpu"):
    return (
        torch.randn(shape, dtype=dtype, device=device)
        if dtype.is_floating_point
        else torch.ones(shape, dtype=dtype, device=device)
    )


def m(*shape, device="cpu"):
    return torch.ones(*shape, dtype=torch.bool, device=device)


# Mixed devices: 'meta' needs no accelerator, and the ops' device checks (C++ and fake kernels) see
# it as a different device; on a CUDA machine the cuda variants run as well.
OTHER = "meta"


def _pool_module():
    return mnn.AttentionPooling(4, hidden_dim=8)


def _msa():
    return mnn.MaskedSelfAttention(8, num_heads=2)


def _jit_block():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mnn.MaskedSelfAttention(8, num_heads=2)

        def forward(self, x):
            return x + self.attn(x)

    return Block()


def _lsca():
    return mnn.LearnableScaleCrossAttention(4)


def _sap():
    return mnn.SpatialAttentionPool(3, hidden=4)


def _offs(*v):
    return torch.tensor(v, dtype=I64)


CASES = [
    # ---- masked_attention_pool
    Case(
        "masked_attention_pool",
        "rank",
        "features 2-D",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3)),
        RuntimeError,
        r"features must be \[B, N, D\]",
    ),
    Case(
        "masked_attention_pool",
        "rank",
        "logits 4-D",
        lambda: maskattn.masked_attention_pool(r(2, 3, 1, 1), r(2, 3, 4)),
        RuntimeError,
        r"logits must be \[B, N\] or \[B, N, K\]",
    ),
    Case(
        "masked_attention_pool",
        "shape",
        "logits N != features N",
        lambda: maskattn.masked_attention_pool(r(2, 5), r(2, 3, 4)),
        RuntimeError,
        r"logits .* and features .* must agree",
    ),
    Case(
        "masked_attention_pool",
        "shape",
        "mask [B, N+1]",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4), m(2, 4)),
        RuntimeError,
        r"mask must be \[B, N\]",
    ),
    Case(
        "masked_attention_pool",
        "rank",
        "mask 3-D",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4), m(2, 3, 1)),
        RuntimeError,
        r"mask must be \[B, N\]",
    ),
    Case(
        "masked_attention_pool",
        "dtype",
        "integer features",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4, dtype=I64)),
        RuntimeError,
        r"features must be float32, float64, float16 or bfloat16",
    ),
    Case(
        "masked_attention_pool",
        "dtype",
        "logits float64, features float32",
        lambda: maskattn.masked_attention_pool(r(2, 3, dtype=F64), r(2, 3, 4)),
        RuntimeError,
        r"logits \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "masked_attention_pool",
        "dtype",
        "complex mask",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4), torch.ones(2, 3, dtype=torch.complex64)),
        RuntimeError,
        r"masked_attention_pool: mask must be a bool, integer or floating tensor",
    ),
    Case(
        "masked_attention_pool",
        "device",
        "logits on another device than features",
        lambda: maskattn.masked_attention_pool(r(2, 3, device=OTHER), r(2, 3, 4)),
        RuntimeError,
        r"logits \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_attention_pool",
        "device",
        "mask on another device than features",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4), m(2, 3, device=OTHER)),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_attention_pool",
        "device",
        "mask on CUDA, features on CPU",
        lambda: maskattn.masked_attention_pool(r(2, 3), r(2, 3, 4), m(2, 3, device="cuda")),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
        cuda=True,
    ),
    # ---- masked_attention_pool_packed
    Case(
        "masked_attention_pool_packed",
        "rank",
        "features 3-D",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(1, 5, 4), _offs(0, 5)),
        RuntimeError,
        r"features must be \[T, D\]",
    ),
    Case(
        "masked_attention_pool_packed",
        "rank",
        "logits 3-D",
        lambda: maskattn.masked_attention_pool_packed(r(5, 1, 1), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits must be \[T\] or \[T, K\]",
    ),
    Case(
        "masked_attention_pool_packed",
        "shape",
        "logits T != features T",
        lambda: maskattn.masked_attention_pool_packed(r(4), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits .* and features .* must agree in T",
    ),
    Case(
        "masked_attention_pool_packed",
        "rank",
        "offsets 2-D",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, 5).view(1, 2)),
        RuntimeError,
        r"offsets must be 1-D \[B\+1\]",
    ),
    Case(
        "masked_attention_pool_packed",
        "shape",
        "offsets empty",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), torch.empty(0, dtype=I64)),
        RuntimeError,
        r"offsets must be 1-D \[B\+1\]",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "float offsets",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), torch.tensor([0.0, 5.0])),
        RuntimeError,
        r"offsets must be int64",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "int32 offsets",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), torch.tensor([0, 5], dtype=torch.int32)),
        RuntimeError,
        r"offsets must be int64",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "offsets[0] != 0",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(1, 5)),
        RuntimeError,
        r"offsets\[0\] must be 0",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "decreasing offsets",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, 3, 2, 5)),
        RuntimeError,
        r"offsets must be non-decreasing",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "negative offset",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, -1, 5)),
        RuntimeError,
        r"offsets must be non-decreasing",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "offsets[-1] != T",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, 2, 4)),
        RuntimeError,
        r"offsets\[-1\] = 4 must equal T",
    ),
    Case(
        "masked_attention_pool_packed",
        "dtype",
        "integer features",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4, dtype=I64), _offs(0, 5)),
        RuntimeError,
        r"features must be float32",
    ),
    Case(
        "masked_attention_pool_packed",
        "dtype",
        "logits float64, features float32",
        lambda: maskattn.masked_attention_pool_packed(r(5, dtype=F64), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "masked_attention_pool_packed",
        "device",
        "offsets on another device than features",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, 5).to(OTHER)),
        RuntimeError,
        r"offsets \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_attention_pool_packed",
        "device",
        "offsets on CUDA, features on CPU",
        lambda: maskattn.masked_attention_pool_packed(r(5), r(5, 4), _offs(0, 5).cuda()),
        RuntimeError,
        r"offsets \(.*\) and features \(.*\) must be on the same device",
        cuda=True,
    ),
    # ---- attention_pool_partial(_packed) / attention_pool_merge / attention_pool_weights
    Case(
        "attention_pool_partial",
        "rank",
        "features 2-D",
        lambda: maskattn.attention_pool_partial(r(2, 3), r(3, 4)),
        RuntimeError,
        r"attention_pool_partial: masked_attention_pool: features must be \[B, N, D\]",
    ),
    Case(
        "attention_pool_partial_packed",
        "offsets",
        "offsets not ending at T",
        lambda: maskattn.attention_pool_partial_packed(r(5), r(5, 4), _offs(0, 4)),
        RuntimeError,
        r"attention_pool_partial_packed: masked_attention_pool_packed: offsets",
    ),
    Case(
        "attention_pool_merge",
        "shape",
        "lse not pooled's shape without D",
        lambda: maskattn.attention_pool_merge(r(2, 3, 4), r(2, 4)),
        ValueError,
        r"attention_pool_merge: pooled must be \[C, B, \(K,\) D\] and lse \[C, B, \(K,\)\]",
    ),
    Case(
        "attention_pool_merge",
        "value",
        "negative dim",
        lambda: maskattn.attention_pool_merge(r(2, 3, 4), r(2, 3), dim=-1),
        ValueError,
        r"attention_pool_merge: dim must be a non-negative chunk axis",
    ),
    Case(
        "attention_pool_weights",
        "shape",
        "lse [B'] for logits [B, n]",
        lambda: maskattn.attention_pool_weights(r(2, 5), r(3)),
        ValueError,
        r"attention_pool_weights: logits must be \[B, n\] or \[B, n, K\] and lse",
    ),
    # ---- chunked_attention_pool
    Case(
        "chunked_attention_pool",
        "value",
        "chunk_size 0",
        lambda: maskattn.chunked_attention_pool(lambda x: x.sum(-1), r(2, 3, 4), 0),
        ValueError,
        r"chunked_attention_pool: chunk_size must be an int >= 1",
    ),
    Case(
        "chunked_attention_pool",
        "rank",
        "features 4-D",
        lambda: maskattn.chunked_attention_pool(lambda x: x.sum(-1), r(1, 2, 3, 4), 2),
        ValueError,
        r"chunked_attention_pool: features must be \[N, D\], \[B, N, D\] or packed",
    ),
    Case(
        "chunked_attention_pool",
        "shape",
        "mask [B, N+1]",
        lambda: maskattn.chunked_attention_pool(lambda x: x.sum(-1), r(2, 3, 4), 2, mask=m(2, 4)),
        ValueError,
        r"chunked_attention_pool: mask must be \(2, 3\)",
    ),
    Case(
        "chunked_attention_pool",
        "shape",
        "score_fn returns [B, n, D, 1]",
        lambda: maskattn.chunked_attention_pool(lambda x: x[..., None], r(2, 3, 4), 2),
        ValueError,
        r"chunked_attention_pool: score_fn must map features",
    ),
    Case(
        "chunked_attention_pool",
        "offsets",
        "offsets not ending at T",
        lambda: maskattn.chunked_attention_pool(lambda x: x.sum(-1), r(5, 4), 2, offsets=_offs(0, 4)),
        ValueError,
        r"chunked_attention_pool: offsets must rise from 0 to T = 5",
    ),
    Case(
        "distributed.merge_across_ranks",
        "value",
        "no process group",
        lambda: maskattn.distributed.merge_across_ranks(r(2, 4), r(2)),
        RuntimeError,
        r"merge_across_ranks: torch.distributed is not initialised",
    ),
    Case(
        "distributed.merge_across_ranks",
        "value",
        "grads='avg'",
        lambda: maskattn.distributed.merge_across_ranks(r(2, 4), r(2), grads="avg"),
        ValueError,
        r"merge_across_ranks: grads must be one of",
    ),
    # ---- masked_channel_attention_pool(_packed): PyG's feature-level gate
    Case(
        "masked_channel_attention_pool",
        "rank",
        "features 2-D",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3), r(2, 3)),
        RuntimeError,
        r"masked_channel_attention_pool: features must be \[B, N, D\]",
    ),
    Case(
        "masked_channel_attention_pool",
        "rank",
        "logits [B, N] (one logit per row, not per channel)",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3), r(2, 3, 4)),
        RuntimeError,
        r"logits must be \[B, N, D\] \(one gate logit per row and channel\)",
    ),
    Case(
        "masked_channel_attention_pool",
        "shape",
        "logits D != features D",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 1), r(2, 3, 4)),
        RuntimeError,
        r"logits \[2, 3, 1\] and features \[2, 3, 4\] must have the same shape",
    ),
    Case(
        "masked_channel_attention_pool",
        "shape",
        "mask [B, N+1]",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4), r(2, 3, 4), m(2, 4)),
        RuntimeError,
        r"mask must be \[B, N\] = \[2, 3\]",
    ),
    Case(
        "masked_channel_attention_pool",
        "dtype",
        "integer features",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4, dtype=I64), r(2, 3, 4, dtype=I64)),
        RuntimeError,
        r"masked_channel_attention_pool: features must be float32",
    ),
    Case(
        "masked_channel_attention_pool",
        "dtype",
        "logits float64, features float32",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4, dtype=F64), r(2, 3, 4)),
        RuntimeError,
        r"logits \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "masked_channel_attention_pool",
        "dtype",
        "complex mask",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4), r(2, 3, 4), torch.ones(2, 3, dtype=torch.complex64)),
        MASK_DTYPE,
        r"masked_channel_attention_pool: mask must be a bool, integer or floating tensor",
    ),
    Case(
        "masked_channel_attention_pool",
        "device",
        "logits on another device than features",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4, device=OTHER), r(2, 3, 4)),
        RuntimeError,
        r"logits \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_channel_attention_pool",
        "device",
        "mask on another device than features",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4), r(2, 3, 4), m(2, 3, device=OTHER)),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_channel_attention_pool",
        "device",
        "mask on CUDA, features on CPU",
        lambda: maskattn.masked_channel_attention_pool(r(2, 3, 4), r(2, 3, 4), m(2, 3, device="cuda")),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
        cuda=True,
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "rank",
        "features 3-D",
        lambda: maskattn.masked_channel_attention_pool_packed(r(1, 5, 4), r(1, 5, 4), _offs(0, 5)),
        RuntimeError,
        r"masked_channel_attention_pool_packed: features must be \[T, D\]",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "rank",
        "logits [T] (one logit per row, not per channel)",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits must be \[T, D\] \(one gate logit per row and channel\)",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "shape",
        "logits T != features T",
        lambda: maskattn.masked_channel_attention_pool_packed(r(4, 4), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits \[4, 4\] and features \[5, 4\] must have the same shape",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "rank",
        "offsets 2-D",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(0, 5).view(1, 2)),
        RuntimeError,
        r"offsets must be 1-D \[B\+1\]",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "offsets",
        "int32 offsets",
        lambda: maskattn.masked_channel_attention_pool_packed(
            r(5, 4), r(5, 4), torch.tensor([0, 5], dtype=torch.int32)
        ),
        RuntimeError,
        r"offsets must be int64",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "offsets",
        "offsets[0] != 0",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(1, 5)),
        RuntimeError,
        r"offsets\[0\] must be 0",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "offsets",
        "decreasing offsets",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(0, 3, 2, 5)),
        RuntimeError,
        r"offsets must be non-decreasing",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "offsets",
        "offsets[-1] != T",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(0, 2, 4)),
        RuntimeError,
        r"offsets\[-1\] = 4 must equal T",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "dtype",
        "integer features",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4, dtype=I64), r(5, 4, dtype=I64), _offs(0, 5)),
        RuntimeError,
        r"masked_channel_attention_pool_packed: features must be float32",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "dtype",
        "logits float64, features float32",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4, dtype=F64), r(5, 4), _offs(0, 5)),
        RuntimeError,
        r"logits \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "device",
        "offsets on another device than features",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(0, 5).to(OTHER)),
        RuntimeError,
        r"offsets \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "device",
        "offsets on CUDA, features on CPU",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4), _offs(0, 5).cuda()),
        RuntimeError,
        r"offsets \(.*\) and features \(.*\) must be on the same device",
        cuda=True,
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "value",
        "offsets and batch both",
        lambda: maskattn.masked_channel_attention_pool_packed(
            r(5, 4), r(5, 4), _offs(0, 5), batch=torch.zeros(5, dtype=I64)
        ),
        ValueError,
        r"masked_channel_attention_pool_packed: pass offsets or batch, not both",
    ),
    Case(
        "masked_channel_attention_pool_packed",
        "value",
        "neither offsets nor batch",
        lambda: maskattn.masked_channel_attention_pool_packed(r(5, 4), r(5, 4)),
        ValueError,
        r"masked_channel_attention_pool_packed: offsets \[B\+1\] .* is required",
    ),
    # ---- masked_softmax
    Case(
        "masked_softmax",
        "dtype",
        "integer scores",
        lambda: maskattn.masked_softmax(r(2, 3, dtype=I64), m(2, 3)),
        RuntimeError,
        r"scores must be float32, float64, float16 or bfloat16",
    ),
    Case(
        "masked_softmax",
        "shape",
        "mask not broadcastable",
        lambda: maskattn.masked_softmax(r(2, 3), m(2, 4)),
        RuntimeError,
        r"mask of shape .* does not broadcast to scores",
    ),
    Case(
        "masked_softmax",
        "rank",
        "mask of higher rank than scores",
        lambda: maskattn.masked_softmax(r(2, 3), m(1, 2, 3)),
        RuntimeError,
        r"mask of shape .* does not broadcast to scores",
    ),
    Case(
        "masked_softmax",
        "value",
        "dim out of range",
        lambda: maskattn.masked_softmax(r(2, 3), m(2, 3), dim=2),
        (RuntimeError, IndexError),
        r"dim",
    ),
    Case(
        "masked_softmax",
        "dtype",
        "complex mask",
        lambda: maskattn.masked_softmax(r(2, 3), torch.ones(2, 3, dtype=torch.complex64)),
        RuntimeError,
        r"mask must be a bool, integer or floating tensor",
    ),
    Case(
        "masked_softmax",
        "device",
        "mask on another device than scores",
        lambda: maskattn.masked_softmax(r(2, 3), m(2, 3, device=OTHER)),
        RuntimeError,
        r"scores \(.*\) and mask \(.*\) must be on the same device",
    ),
    Case(
        "masked_softmax",
        "device",
        "mask on CUDA, scores on CPU",
        lambda: maskattn.masked_softmax(r(2, 3), m(2, 3, device="cuda")),
        RuntimeError,
        r"scores \(.*\) and mask \(.*\) must be on the same device",
        cuda=True,
    ),
    Case(
        "masked_softmax",
        "value",
        "NaN scale",
        lambda: maskattn.masked_softmax(r(2, 3), m(2, 3), scale=float("nan")),
        RuntimeError,
        r"masked_softmax: scale must be finite, got nan",
    ),
    # ---- patch_mask / patch_mask_to_image
    Case(
        "patch_mask",
        "rank",
        "image_mask 2-D",
        lambda: maskattn.patch_mask(m(4, 4), 2),
        RuntimeError,
        r"image_mask must be \[B, H, W\]",
    ),
    Case(
        "patch_mask",
        "shape",
        "H not a multiple of patch_size",
        lambda: maskattn.patch_mask(m(1, 5, 4), 2),
        RuntimeError,
        r"must both be multiples of patch_size",
    ),
    Case(
        "patch_mask",
        "size",
        "patch_size 0",
        lambda: maskattn.patch_mask(m(1, 4, 4), 0),
        RuntimeError,
        r"patch_size must be positive",
    ),
    Case(
        "patch_mask",
        "size",
        "negative patch_size",
        lambda: maskattn.patch_mask(m(1, 4, 4), -2),
        RuntimeError,
        r"patch_size must be positive",
    ),
    Case(
        "patch_mask",
        "value",
        "threshold > 1",
        lambda: maskattn.patch_mask(m(1, 4, 4), 2, 1.5),
        RuntimeError,
        r"threshold must be in \[0, 1\]",
    ),
    Case(
        "patch_mask",
        "dtype",
        "float patch_size",
        lambda: maskattn.patch_mask(m(1, 4, 4), 2.5),
        (TypeError, RuntimeError),
        r"patch_size",
    ),
    Case(
        "patch_mask_to_image",
        "rank",
        "patch_mask 3-D",
        lambda: maskattn.patch_mask_to_image(m(1, 2, 2), 2, 4),
        ValueError,
        r"patch_mask must be \[B, 4\]",
    ),
    Case(
        "patch_mask_to_image",
        "shape",
        "patch_mask has the wrong number of patches",
        lambda: maskattn.patch_mask_to_image(m(1, 3), 2, 4),
        ValueError,
        r"patch_mask must be \[B, 4\]",
    ),
    Case(
        "patch_mask_to_image",
        "size",
        "negative patch_size",
        lambda: maskattn.patch_mask_to_image(m(1, 4), -2, 4),
        ValueError,
        r"patch_size must be positive",
    ),
    Case(
        "patch_mask_to_image",
        "size",
        "negative image_size",
        lambda: maskattn.patch_mask_to_image(m(1, 4), 2, (-4, 4)),
        ValueError,
        r"image_size",
    ),
    Case(
        "patch_mask_to_image",
        "shape",
        "image_size not a multiple of patch_size",
        lambda: maskattn.patch_mask_to_image(m(1, 4), 3, 4),
        ValueError,
        r"must be multiples of patch_size",
    ),
    Case(
        "patch_mask",
        "dtype",
        "complex image_mask",
        lambda: maskattn.patch_mask(torch.ones(1, 4, 4, dtype=torch.complex64), 2),
        MASK_DTYPE,
        r"patch_mask: image_mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "patch_mask",
        "value",
        "NaN threshold",
        lambda: maskattn.patch_mask(m(1, 4, 4), 2, float("nan")),
        RuntimeError,
        r"threshold must be in \[0, 1\], got nan",
    ),
    Case(
        "patch_mask_to_image",
        "type",
        "float patch_size",
        lambda: maskattn.patch_mask_to_image(m(1, 4), 2.5, 4),
        TypeError,
        r"patch_mask_to_image: patch_size must be an int, got 2.5",
    ),
    Case(
        "patch_mask_to_image",
        "type",
        "image_size a string",
        lambda: maskattn.patch_mask_to_image(m(1, 4), 2, "4"),
        TypeError,
        r"image_size must be an int H or a pair \(H, W\), got '4'",
    ),
    Case(
        "patch_mask_to_image",
        "type",
        "image_size of three values",
        lambda: maskattn.patch_mask_to_image(m(1, 4), 2, (4, 4, 4)),
        TypeError,
        r"image_size must be an int H or a pair \(H, W\)",
    ),
    Case(
        "patch_mask_to_image",
        "dtype",
        "complex patch_mask",
        lambda: maskattn.patch_mask_to_image(torch.ones(1, 4, dtype=torch.complex64), 2, 4),
        MASK_DTYPE,
        r"patch_mask_to_image: patch_mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "patch_mask",
        "type",
        "bool patch_size",
        lambda: maskattn.patch_mask(m(1, 4, 4), True),
        TypeError,
        r"patch_mask: patch_size must be an int, got True",
    ),
    # ---- gated_attention_scores
    Case(
        "gated_attention_scores",
        "rank",
        "0-dim v_pre",
        lambda: maskattn.gated_attention_scores(r(), r(), r(1, 1)),
        RuntimeError,
        r"gated_attention_scores: v_pre must be \[\.\.\., H\] with at least one dim, got shape \[\]",
    ),
    Case(
        "gated_attention_scores",
        "shape",
        "u_pre of another shape",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 2), r(1, 3)),
        RuntimeError,
        r"gated_attention_scores: u_pre \[4, 2\] must match v_pre \[4, 3\]",
    ),
    Case(
        "gated_attention_scores",
        "shape",
        "weight of another H",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(1, 2)),
        RuntimeError,
        r"gated_attention_scores: weight must be \[K, H\] with H = 3 \(the last dim of v_pre \[4, 3\]\), got shape \[1, 2\]",
    ),
    Case(
        "gated_attention_scores",
        "shape",
        "bias not [K]",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(2, 3), r(3)),
        RuntimeError,
        r"gated_attention_scores: bias must be \[K\] = \[2\] to match weight \[2, 3\], got shape \[3\]",
    ),
    Case(
        "gated_attention_scores",
        "dtype",
        "integer v_pre",
        lambda: maskattn.gated_attention_scores(r(4, 3, dtype=I64), r(4, 3, dtype=I64), r(1, 3, dtype=I64)),
        RuntimeError,
        r"gated_attention_scores: v_pre must be",
    ),
    Case(
        "gated_attention_scores",
        "dtype",
        "float64 weight with float32 v_pre",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(1, 3, dtype=F64)),
        RuntimeError,
        r"gated_attention_scores: weight \(Double\) and v_pre \(Float\) must have the same dtype",
    ),
    Case(
        "gated_attention_scores",
        "device",
        "weight on another device",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(1, 3, device=OTHER)),
        RuntimeError,
        r"gated_attention_scores: weight",
    ),
    Case(
        "gated_attention_scores",
        "shape",
        "u_bias not [H]",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(1, 3), u_bias=r(4)),
        RuntimeError,
        r"gated_attention_scores: u_bias must be \[H\] = \[3\] to match v_pre \[4, 3\], got shape \[4\]",
    ),
    Case(
        "gated_attention_scores",
        "value",
        "unknown act",
        lambda: maskattn.gated_attention_scores(r(4, 3), r(4, 3), r(1, 3), act="sigmoid"),
        RuntimeError,
        r"gated_attention_scores: act must be 'tanh', 'relu' or 'gelu', got 'sigmoid'",
    ),
    # ---- gated_masked_mean
    Case(
        "gated_masked_mean",
        "rank",
        "features 3-D",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4), r(2, 3, 4)),
        RuntimeError,
        r"features must be \[B, C, H, W\]",
    ),
    Case(
        "gated_masked_mean",
        "shape",
        "gate_logits of another H, W",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 5)),
        RuntimeError,
        r"gate_logits",
    ),
    Case(
        "gated_masked_mean",
        "rank",
        "gate_logits 2-D",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 16)),
        RuntimeError,
        r"gate_logits",
    ),
    Case(
        "gated_masked_mean",
        "shape",
        "mask of another H, W",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 4), m(2, 4, 5)),
        RuntimeError,
        r"mask",
    ),
    Case(
        "gated_masked_mean",
        "dtype",
        "integer features",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4, dtype=I64), r(2, 1, 4, 4, dtype=I64)),
        RuntimeError,
        r"features must be float32",
    ),
    Case(
        "gated_masked_mean",
        "dtype",
        "gate_logits float64, features float32",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 4, dtype=F64)),
        RuntimeError,
        r"gate_logits .*features .*same dtype",
    ),
    Case(
        "gated_masked_mean",
        "device",
        "mask on another device than features",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 4), m(2, 4, 4, device=OTHER)),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "gated_masked_mean",
        "device",
        "gate_logits on another device than features",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 4, device=OTHER)),
        RuntimeError,
        r"gate_logits \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "gated_masked_mean",
        "dtype",
        "complex mask",
        lambda: maskattn.gated_masked_mean(r(2, 3, 4, 4), r(2, 1, 4, 4), torch.ones(2, 4, 4, dtype=torch.complex64)),
        MASK_DTYPE,
        r"gated_masked_mean: mask must be a bool, integer or floating tensor, got complex64",
    ),
    # ---- foreground_mask
    Case(
        "foreground_mask",
        "rank",
        "images 2-D",
        lambda: maskattn.foreground_mask(r(4, 4)),
        RuntimeError,
        r"images must be \[B, C, H, W\] or \[B, H, W\]",
    ),
    Case(
        "foreground_mask", "dtype", "bool images", lambda: maskattn.foreground_mask(m(1, 4, 4)), RuntimeError, r"images"
    ),
    Case(
        "foreground_mask",
        "size",
        "negative open_radius",
        lambda: maskattn.foreground_mask(r(1, 4, 4), open_radius=-1),
        RuntimeError,
        r"open_radius",
    ),
    Case(
        "foreground_mask",
        "size",
        "negative close_radius",
        lambda: maskattn.foreground_mask(r(1, 4, 4), close_radius=-1),
        RuntimeError,
        r"close_radius",
    ),
    Case(
        "foreground_mask",
        "value",
        "negative sigma",
        lambda: maskattn.foreground_mask(r(1, 4, 4), sigma=-1.0),
        RuntimeError,
        r"sigma",
    ),
    Case(
        "foreground_mask",
        "type",
        "float open_radius",
        lambda: maskattn.foreground_mask(r(1, 4, 4), open_radius=1.5),
        TypeError,
        r"foreground_mask: open_radius must be an int, got 1.5",
    ),
    Case(
        "foreground_mask",
        "type",
        "fill_holes a string",
        lambda: maskattn.foreground_mask(r(1, 4, 4), fill_holes="no"),
        TypeError,
        r"foreground_mask: fill_holes must be a bool, got 'no'",
    ),
    # ---- scaled_cross_attention
    Case(
        "scaled_cross_attention",
        "rank",
        "query 4-D",
        lambda: maskattn.scaled_cross_attention(r(2, 1, 3, 4), r(5, 4), r(5, 6), r()),
        RuntimeError,
        r"query must be \[B, Lq, D\] or \[B, D\]",
    ),
    Case(
        "scaled_cross_attention",
        "rank",
        "key 1-D",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(4), r(5, 6), r()),
        RuntimeError,
        r"key must be",
    ),
    Case(
        "scaled_cross_attention",
        "rank",
        "logit_scale_log 1-D",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4), r(5, 6), r(1)),
        RuntimeError,
        r"logit_scale_log must be a 0-dim tensor",
    ),
    Case(
        "scaled_cross_attention",
        "shape",
        "key D != query D",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 3), r(5, 6), r()),
        RuntimeError,
        r"key .*query",
    ),
    Case(
        "scaled_cross_attention",
        "shape",
        "value Lk != key Lk",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4), r(6, 6), r()),
        RuntimeError,
        r"value",
    ),
    Case(
        "scaled_cross_attention",
        "shape",
        "key_mask of wrong Lk",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4), r(5, 6), r(), key_mask=m(2, 4)),
        RuntimeError,
        r"key_mask",
    ),
    Case(
        "scaled_cross_attention",
        "dtype",
        "integer query",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4, dtype=I64), r(5, 4, dtype=I64), r(5, 6, dtype=I64), r()),
        RuntimeError,
        r"query must be float32",
    ),
    Case(
        "scaled_cross_attention",
        "dtype",
        "key float64, query float32",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4, dtype=F64), r(5, 6), r()),
        RuntimeError,
        r"key",
    ),
    Case(
        "scaled_cross_attention",
        "device",
        "key on another device than query",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4, device=OTHER), r(5, 6), r()),
        RuntimeError,
        r"key \(.*\) and query \(.*\) must be on the same device",
    ),
    Case(
        "scaled_cross_attention",
        "value",
        "max_scale <= 0",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4), r(5, 6), r(), max_scale=-1.0),
        RuntimeError,
        r"max_scale",
    ),
    Case(
        "scaled_cross_attention",
        "dtype",
        "complex key_mask",
        lambda: maskattn.scaled_cross_attention(
            r(2, 3, 4), r(5, 4), r(5, 6), r(), key_mask=torch.ones(5, dtype=torch.complex64)
        ),
        MASK_DTYPE,
        r"scaled_cross_attention: key_mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "scaled_cross_attention",
        "value",
        "NaN max_scale",
        lambda: maskattn.scaled_cross_attention(r(2, 3, 4), r(5, 4), r(5, 6), r(), max_scale=float("nan")),
        RuntimeError,
        r"max_scale must be positive .*got nan",
    ),
    # ---- backward ops: public entry points too (torch.ops.maskattn._*_backward), checked as the
    # forward ops are: every gradient in the dtype of what it is the gradient of
    Case(
        "torch.ops.maskattn._masked_attention_pool_backward",
        "rank",
        "features 2-D",
        lambda: _OPS._masked_attention_pool_backward(r(2, 4), None, r(2, 3), r(2, 3), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_backward: features must be \[B, N, D\]",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_backward",
        "shape",
        "grad_pooled [B, D+1]",
        lambda: _OPS._masked_attention_pool_backward(r(2, 5), None, r(2, 3), r(2, 3, 4), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_backward: grad_pooled has shape \[2, 5\], expected \[2, 4\]",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_backward",
        "dtype",
        "grad_pooled float64, features float32",
        lambda: _OPS._masked_attention_pool_backward(r(2, 4, dtype=F64), None, r(2, 3), r(2, 3, 4), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_backward: grad_pooled \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_backward",
        "dtype",
        "integer grad_weights",
        lambda: _OPS._masked_attention_pool_backward(r(2, 4), r(2, 3, dtype=I64), r(2, 3), r(2, 3, 4), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_backward: grad_weights \(Long\) and weights \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_backward",
        "device",
        "grad_pooled on another device than features",
        lambda: _OPS._masked_attention_pool_backward(r(2, 4, device=OTHER), None, r(2, 3), r(2, 3, 4), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_backward: grad_pooled \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "offsets",
        "offsets past T",
        lambda: _OPS._masked_attention_pool_packed_backward(
            r(2, 4), None, r(5), r(5, 4), _offs(0, 100000, 5), [True, True]
        ),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: offsets must be non-decreasing, but offsets\[2\] = 5",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "offsets",
        "offsets[-1] != T",
        lambda: _OPS._masked_attention_pool_packed_backward(r(2, 4), None, r(5), r(5, 4), _offs(0, 2, 4), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: offsets\[-1\] = 4 must equal T = features.size\(0\) = 5",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "offsets",
        "negative offsets[0]",
        lambda: _OPS._masked_attention_pool_packed_backward(
            r(2, 4), None, r(5), r(5, 4), _offs(-1, 2, 5), [True, True]
        ),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: offsets\[0\] must be 0, got -1",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "dtype",
        "int32 offsets",
        lambda: _OPS._masked_attention_pool_packed_backward(
            r(2, 4), None, r(5), r(5, 4), _offs(0, 2, 5).int(), [True, True]
        ),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: offsets must be int64, got Int",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "shape",
        "grad_pooled for another number of bags",
        lambda: _OPS._masked_attention_pool_packed_backward(r(3, 4), None, r(5), r(5, 4), _offs(0, 2, 5), [True, True]),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: grad_pooled has shape \[3, 4\], expected \[2, 4\]",
    ),
    Case(
        "torch.ops.maskattn._masked_attention_pool_packed_backward",
        "device",
        "offsets on another device than features",
        lambda: _OPS._masked_attention_pool_packed_backward(
            r(2, 4), None, r(5), r(5, 4), _offs(0, 2, 5).to(OTHER), [True, True]
        ),
        RuntimeError,
        r"_masked_attention_pool_packed_backward: offsets \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "torch.ops.maskattn._masked_softmax_backward",
        "shape",
        "grad_output of another shape",
        lambda: _OPS._masked_softmax_backward(r(2, 4), r(2, 5), -1, 1.0),
        RuntimeError,
        r"_masked_softmax_backward: grad_output \[2, 4\] must have the shape of output \[2, 5\]",
    ),
    Case(
        "torch.ops.maskattn._masked_softmax_backward",
        "dtype",
        "grad_output float64, output float32",
        lambda: _OPS._masked_softmax_backward(r(2, 5, dtype=F64), r(2, 5), -1, 1.0),
        RuntimeError,
        r"_masked_softmax_backward: grad_output \(Double\) and output \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._masked_softmax_backward",
        "dtype",
        "integer output",
        lambda: _OPS._masked_softmax_backward(r(2, 5, dtype=I64), r(2, 5, dtype=I64), -1, 1.0),
        RuntimeError,
        r"_masked_softmax_backward: output must be float32, float64, float16 or bfloat16",
    ),
    Case(
        "torch.ops.maskattn._masked_softmax_backward",
        "value",
        "dim out of range",
        lambda: _OPS._masked_softmax_backward(r(2, 5), r(2, 5), 2, 1.0),
        RuntimeError,
        r"_masked_softmax_backward: dim = 2 is out of range",
    ),
    Case(
        "torch.ops.maskattn._masked_softmax_backward",
        "device",
        "output on another device than grad_output",
        lambda: _OPS._masked_softmax_backward(r(2, 5), r(2, 5, device=OTHER), -1, 1.0),
        RuntimeError,
        r"_masked_softmax_backward: grad_output \(.*\) and output \(.*\) must be on the same device",
    ),
    Case(
        "torch.ops.maskattn._gated_attention_scores_backward",
        "shape",
        "grad not [..., K]",
        lambda: _OPS._gated_attention_scores_backward(
            r(4, 2), r(4, 3), r(4, 3), r(1, 3), "tanh", None, None, [True] * 6
        ),
        RuntimeError,
        r"_gated_attention_scores_backward: grad must be \[\.\.\., K\] = \[4, 1\] \(v_pre \[4, 3\] with K = 1\), got shape \[4, 2\]",
    ),
    Case(
        "torch.ops.maskattn._gated_attention_scores_backward",
        "dtype",
        "float64 grad",
        lambda: _OPS._gated_attention_scores_backward(
            r(4, 1, dtype=F64), r(4, 3), r(4, 3), r(1, 3), "tanh", None, None, [True] * 6
        ),
        RuntimeError,
        r"_gated_attention_scores_backward: grad \(Double\) and v_pre \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._gated_attention_scores_backward",
        "size",
        "output_mask of 4 entries",
        lambda: _OPS._gated_attention_scores_backward(
            r(4, 1), r(4, 3), r(4, 3), r(1, 3), "tanh", None, None, [True] * 4
        ),
        RuntimeError,
        r"Tried to convert a List with 4 elements to a fixed-size array of size 6",
    ),
    Case(
        "torch.ops.maskattn._gated_attention_scores_backward",
        "value",
        "unknown act",
        lambda: _OPS._gated_attention_scores_backward(
            r(4, 1), r(4, 3), r(4, 3), r(1, 3), "Tanh", None, None, [True] * 6
        ),
        RuntimeError,
        r"_gated_attention_scores_backward: act must be 'tanh', 'relu' or 'gelu', got 'Tanh'",
    ),
    Case(
        "torch.ops.maskattn._gated_masked_mean_backward",
        "shape",
        "grad_pooled [B, C+1]",
        lambda: _OPS._gated_masked_mean_backward(r(2, 4), None, r(2, 3, 4, 4), r(2, 4, 4), None, [True, True]),
        RuntimeError,
        r"_gated_masked_mean_backward: grad_pooled must be \[B, C\] = \[2, 3\]",
    ),
    Case(
        "torch.ops.maskattn._gated_masked_mean_backward",
        "dtype",
        "gate float64, features float32",
        lambda: _OPS._gated_masked_mean_backward(
            r(2, 3), None, r(2, 3, 4, 4), r(2, 4, 4, dtype=F64), None, [True, True]
        ),
        RuntimeError,
        r"_gated_masked_mean_backward: gate \(Double\) and features \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._gated_masked_mean_backward",
        "dtype",
        "integer grad_gate",
        lambda: _OPS._gated_masked_mean_backward(
            r(2, 3), r(2, 4, 4, dtype=I64), r(2, 3, 4, 4), r(2, 4, 4), None, [True, True]
        ),
        RuntimeError,
        r"_gated_masked_mean_backward: grad_gate \(Long\) and gate \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._gated_masked_mean_backward",
        "dtype",
        "complex mask",
        lambda: _OPS._gated_masked_mean_backward(
            r(2, 3), None, r(2, 3, 4, 4), r(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.complex64), [True, True]
        ),
        RuntimeError,
        r"_gated_masked_mean_backward: mask must be a bool, integer or floating tensor",
    ),
    Case(
        "torch.ops.maskattn._gated_masked_mean_backward",
        "device",
        "gate on another device than features",
        lambda: _OPS._gated_masked_mean_backward(
            r(2, 3), None, r(2, 3, 4, 4), r(2, 4, 4, device=OTHER), None, [True, True]
        ),
        RuntimeError,
        r"_gated_masked_mean_backward: gate \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "torch.ops.maskattn._scaled_cross_attention_backward",
        "shape",
        "grad_out of another Dv",
        lambda: _OPS._scaled_cross_attention_backward(
            r(2, 3, 7), None, r(2, 3, 4), r(5, 4), r(5, 6), r(), r(2, 3, 5), 100.0, False, [True] * 4
        ),
        RuntimeError,
        r"_scaled_cross_attention_backward: grad_out has shape \[2, 3, 7\], expected \[2, 3, 6\]",
    ),
    Case(
        "torch.ops.maskattn._scaled_cross_attention_backward",
        "dtype",
        "grad_attn float64, attn float32",
        lambda: _OPS._scaled_cross_attention_backward(
            r(2, 3, 6), r(2, 3, 5, dtype=F64), r(2, 3, 4), r(5, 4), r(5, 6), r(), r(2, 3, 5), 100.0, False, [True] * 4
        ),
        RuntimeError,
        r"_scaled_cross_attention_backward: grad_attn \(Double\) and attn \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._scaled_cross_attention_backward",
        "rank",
        "logit_scale_log 1-D",
        lambda: _OPS._scaled_cross_attention_backward(
            r(2, 3, 6), None, r(2, 3, 4), r(5, 4), r(5, 6), r(1), r(2, 3, 5), 100.0, False, [True] * 4
        ),
        RuntimeError,
        r"_scaled_cross_attention_backward: logit_scale_log must be a 0-dim tensor",
    ),
    Case(
        "torch.ops.maskattn._scaled_cross_attention_backward",
        "dtype",
        "integer attn",
        lambda: _OPS._scaled_cross_attention_backward(
            r(2, 3, 6), None, r(2, 3, 4), r(5, 4), r(5, 6), r(), r(2, 3, 5, dtype=I64), 100.0, False, [True] * 4
        ),
        RuntimeError,
        r"_scaled_cross_attention_backward: attn \(Long\) and query \(Float\) must have the same dtype",
    ),
    Case(
        "torch.ops.maskattn._scaled_cross_attention_backward",
        "device",
        "grad_out on another device than query",
        lambda: _OPS._scaled_cross_attention_backward(
            r(2, 3, 6, device=OTHER), None, r(2, 3, 4), r(5, 4), r(5, 6), r(), r(2, 3, 5), 100.0, False, [True] * 4
        ),
        RuntimeError,
        r"_scaled_cross_attention_backward: grad_out \(.*\) and query \(.*\) must be on the same device",
    ),
    # ---- pack / unpack / pad_sequences
    Case("pad_sequences", "size", "empty list", lambda: maskattn.pad_sequences([]), ValueError, r"seqs is empty"),
    Case(
        "pad_sequences",
        "shape",
        "trailing dims differ",
        lambda: maskattn.pad_sequences([r(2, 3), r(2, 4)]),
        ValueError,
        r"seqs",
    ),
    Case(
        "pack", "rank", "padded 1-D", lambda: maskattn.pack(r(3), m(3)), ValueError, r"padded must be \[B, N, \.\.\.\]"
    ),
    Case(
        "pack",
        "shape",
        "mask [B, N+1]",
        lambda: maskattn.pack(r(2, 3, 4), m(2, 4)),
        ValueError,
        r"mask must be \[B, N\]",
    ),
    Case(
        "pack",
        "device",
        "mask on another device than padded",
        lambda: maskattn.pack(r(2, 3, 4), m(2, 3, device=OTHER)),
        ValueError,
        r"mask \(.*\) and padded \(.*\) must be on the same device",
    ),
    Case(
        "unpack",
        "rank",
        "packed 0-D",
        lambda: maskattn.unpack(r(), _offs(0, 1)),
        ValueError,
        r"packed must be \[T, \.\.\.\]",
    ),
    Case(
        "unpack",
        "offsets",
        "float offsets",
        lambda: maskattn.unpack(r(5, 2), torch.tensor([0.0, 5.0])),
        ValueError,
        r"offsets must be an int64 \[B\+1\] tensor",
    ),
    Case(
        "unpack",
        "offsets",
        "offsets not ending at T",
        lambda: maskattn.unpack(r(5, 2), _offs(0, 3)),
        ValueError,
        r"offsets must rise from 0 to T",
    ),
    Case(
        "unpack",
        "offsets",
        "negative offset",
        lambda: maskattn.unpack(r(5, 2), _offs(0, -1, 5)),
        ValueError,
        r"offsets must rise from 0 to T",
    ),
    Case(
        "unpack",
        "size",
        "negative max_len",
        lambda: maskattn.unpack(r(5, 2), _offs(0, 5), max_len=-1),
        ValueError,
        r"max_len must be >= 0",
    ),
    # ---- segment indices (PyG's batch vector) and top-k per bag
    Case(
        "offsets_from_batch",
        "offsets",
        "unsorted batch",
        lambda: maskattn.offsets_from_batch(_offs(0, 1, 0)),
        ValueError,
        r"batch must be sorted .*\(first out-of-order position 2",
    ),
    Case(
        "offsets_from_batch",
        "value",
        "id >= num_bags",
        lambda: maskattn.offsets_from_batch(_offs(0, 3), num_bags=2),
        ValueError,
        r"batch holds bag ids in \[0, 3\], outside \[0, num_bags=2\)",
    ),
    Case(
        "offsets_from_batch",
        "dtype",
        "float batch",
        lambda: maskattn.offsets_from_batch(r(3)),
        ValueError,
        r"batch must be a 1-D integer tensor",
    ),
    Case(
        "batch_from_offsets",
        "offsets",
        "offsets not ending at total",
        lambda: maskattn.batch_from_offsets(_offs(0, 2), 3),
        ValueError,
        r"offsets must rise from 0 to total=3",
    ),
    Case(
        "sort_by_batch",
        "shape",
        "tensor with another T",
        lambda: maskattn.sort_by_batch(_offs(1, 0), r(3, 2)),
        ValueError,
        r"tensors\[0\] must have T=2 rows",
    ),
    Case(
        "sort_by_batch",
        "device",
        "tensor on another device than batch",
        lambda: maskattn.sort_by_batch(_offs(1, 0), r(2, device=OTHER)),
        ValueError,
        r"tensors\[0\] \(.*\) and batch \(.*\) must be on the same device",
    ),
    Case(
        "masked_attention_pool_packed",
        "offsets",
        "offsets and batch both given",
        lambda: maskattn.masked_attention_pool_packed(r(2), r(2, 3), _offs(0, 2), batch=_offs(0, 0)),
        ValueError,
        r"pass offsets or batch, not both",
    ),
    Case(
        "topk_per_bag",
        "value",
        "negative k",
        lambda: maskattn.topk_per_bag(r(2, 3), -1),
        ValueError,
        r"k must be a Python int >= 0",
    ),
    Case(
        "topk_per_bag",
        "shape",
        "mask [B, N+1]",
        lambda: maskattn.topk_per_bag(r(2, 3), 2, m(2, 4)),
        ValueError,
        r"mask must be \[2, 3\] to match scores",
    ),
    Case(
        "topk_per_bag",
        "offsets",
        "offsets not ending at T",
        lambda: maskattn.topk_per_bag(r(5), 2, offsets=_offs(0, 3)),
        ValueError,
        r"offsets must rise from 0 to T=5",
    ),
    Case(
        "topk_per_bag",
        "device",
        "mask on another device than scores",
        lambda: maskattn.topk_per_bag(r(2, 3), 2, m(2, 3, device=OTHER)),
        ValueError,
        r"mask \(.*\) and scores \(.*\) must be on the same device",
    ),
    Case(
        "data.collate_bags",
        "shape",
        "bags with different D",
        lambda: maskattn.data.collate_bags([r(2, 3), r(1, 4)]),
        ValueError,
        r"features of samples\[1\] has shape",
    ),
    Case(
        "data.collate_bags",
        "dtype",
        "bags with different dtypes",
        lambda: maskattn.data.collate_bags([r(2, 3), r(1, 3, dtype=F64)]),
        ValueError,
        r"features of samples\[1\] is torch.float64",
    ),
    Case(
        "data.BagCollator",
        "value",
        "unknown layout",
        lambda: maskattn.data.BagCollator("ragged"),
        ValueError,
        r"layout must be 'packed' or 'padded'",
    ),
    Case(
        "data.BagBatchSampler",
        "size",
        "max_instances 0",
        lambda: maskattn.data.BagBatchSampler([3, 4], 0),
        ValueError,
        r"max_instances must be an int >= 1",
    ),
    Case(
        "data.BagBatchSampler",
        "value",
        "rank >= num_replicas",
        lambda: maskattn.data.BagBatchSampler([3, 4], 8, num_replicas=2, rank=2),
        ValueError,
        r"rank must be an int in \[0, num_replicas=2\)",
    ),
    Case(
        "pad_sequences",
        "type",
        "a string",
        lambda: maskattn.pad_sequences("abc"),
        TypeError,
        r"pad_sequences: seqs must be a list of \[N_i, \.\.\.\] tensors, got str",
    ),
    Case(
        "pad_sequences",
        "type",
        "a list holding a non-tensor",
        lambda: maskattn.pad_sequences([r(2, 3), [1.0, 2.0, 3.0]]),
        TypeError,
        r"pad_sequences: seqs\[1\] must be a tensor, got list",
    ),
    Case(
        "pad_sequences",
        "dtype",
        "float32 and float64 sequences",
        lambda: maskattn.pad_sequences([r(2, 3), r(1, 3, dtype=F64)]),
        ValueError,
        r"pad_sequences: seqs\[1\] is torch.float64 on cpu, but seqs\[0\] is torch.float32",
    ),
    Case(
        "pad_sequences",
        "type",
        "padding_value a string",
        lambda: maskattn.pad_sequences([r(2, 3)], padding_value="0"),
        TypeError,
        r"padding_value must be a number",
    ),
    Case(
        "pack",
        "dtype",
        "complex mask",
        lambda: maskattn.pack(r(2, 3, 4), torch.ones(2, 3, dtype=torch.complex64)),
        MASK_DTYPE,
        r"pack: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "pack",
        "type",
        "padded a list",
        lambda: maskattn.pack([[1.0, 2.0]], m(1, 2)),
        TypeError,
        r"pack: padded must be a tensor, got list",
    ),
    Case(
        "unpack",
        "type",
        "float max_len",
        lambda: maskattn.unpack(r(5, 2), _offs(0, 5), max_len=5.0),
        TypeError,
        r"unpack: max_len must be an int, got 5.0",
    ),
    # ---- nn modules
    Case(
        "nn.AttentionPooling.forward",
        "shape",
        "features with another D",
        lambda: _pool_module()(r(2, 3, 5)),
        ValueError,
        r"features must be \[B, N, 4\]",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "rank",
        "features 1-D",
        lambda: _pool_module()(r(4)),
        ValueError,
        r"features must be \[B, N, 4\] \(padded, with mask\), \[T, 4\] \(packed",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "rank",
        "padded features with offsets",
        lambda: _pool_module()(r(2, 3, 4), offsets=torch.tensor([0, 3])),
        ValueError,
        r"packed features \(with offsets/batch\) must be \[T, 4\], got shape \(2, 3, 4\)",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "shape",
        "mask [B, N+1]",
        lambda: _pool_module()(r(2, 3, 4), m(2, 4)),
        RuntimeError,
        r"mask must be \[B, N\]",
    ),
    Case("nn.AttentionPooling", "size", "negative in_dim", lambda: mnn.AttentionPooling(-1), ValueError, r"in_dim"),
    Case(
        "nn.convert.from_pyg",
        "shape",
        "feature-level gate Linear(F, F)",
        lambda: mnn.convert.from_pyg({"gate_nn.weight": r(4, 4), "gate_nn.bias": r(4)}),
        ValueError,
        r"gate_nn has 4 output columns: that is PyG's feature-level gating",
    ),
    Case(
        "nn.convert.from_clam",
        "shape",
        "unknown keys",
        lambda: mnn.convert.from_clam({"fc.weight": r(4, 4)}),
        ValueError,
        r"not a CLAM attention net",
    ),
    Case(
        "nn.convert.from_torchmil",
        "shape",
        "fc2 with two outputs",
        lambda: mnn.convert.from_torchmil(
            {"fc1.module.weight": r(3, 4), "fc1.module.bias": r(3), "fc2.weight": r(2, 3)}
        ),
        ValueError,
        r"fc2 must have one output",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "shape",
        "x with another dim",
        lambda: _msa()(r(2, 3, 4)),
        ValueError,
        r"x must be \[B, N, 8\]",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "shape",
        "mask [B, N+1]",
        lambda: _msa()(r(2, 3, 8), mask=m(2, 4)),
        ValueError,
        r"mask must be \[B, N\]",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "value",
        "both mask and key_padding_mask",
        lambda: _msa()(r(2, 3, 8), mask=m(2, 3), key_padding_mask=m(2, 3)),
        ValueError,
        r"either mask .* or key_padding_mask",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "device",
        "mask on another device than x",
        lambda: _msa()(r(2, 3, 8), mask=m(2, 3, device=OTHER)),
        ValueError,
        r"mask \(.*\) and x \(.*\) must be on the same device",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "size",
        "dim not a multiple of num_heads",
        lambda: mnn.MaskedSelfAttention(6, num_heads=4),
        ValueError,
        r"dim \(6\) must be a positive multiple of num_heads",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "value",
        "unknown norm_layer name",
        lambda: mnn.MaskedSelfAttention(8, num_heads=2, qk_norm=True, norm_layer="batchnorm"),
        ValueError,
        r"norm_layer must be 'rmsnorm', 'layernorm' or a callable",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "value",
        "rope neither callable nor (cos, sin)",
        lambda: _msa()(r(2, 3, 8), rope=1.0),
        TypeError,
        r"rope must be a callable .* or a \(cos, sin\) pair",
    ),
    # ---- packed block stacks
    Case(
        "nn.packed_forward",
        "shape",
        "mask [B, N+1]",
        lambda: mnn.packed_forward([_jit_block()], r(2, 3, 8), m(2, 4)),
        ValueError,
        r"mask must be \[B, N\] = \[2, 3\]",
    ),
    Case(
        "nn.packed_forward",
        "value",
        "blocks without MaskedSelfAttention",
        lambda: mnn.packed_forward([torch.nn.Linear(8, 8)], r(2, 3, 8), m(2, 3)),
        ValueError,
        r"the blocks hold no maskattn.nn.MaskedSelfAttention",
    ),
    Case(
        "nn.PackedBlocks.forward",
        "rank",
        "x 2-D",
        lambda: mnn.PackedBlocks([_jit_block()])(r(3, 8), m(2, 3)),
        ValueError,
        r"x must be a \[B, N, C\] tensor",
    ),
    Case(
        "nn.PackedBlocks.forward",
        "device",
        "mask on another device than x",
        lambda: mnn.PackedBlocks([_jit_block()])(r(2, 3, 8), m(2, 3, device=OTHER)),
        ValueError,
        r"mask \(.*\) and x \(.*\) must be on the same device",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "shape",
        "query with another dim",
        lambda: _lsca()(r(2, 3, 5), r(6, 4)),
        ValueError,
        r"query must be \[B, Lq, 4\] or \[B, 4\]",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "shape",
        "prototypes with another dim",
        lambda: _lsca()(r(2, 3, 4), r(6, 5)),
        (ValueError, RuntimeError),
        r"prototypes|key",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "size",
        "negative dim",
        lambda: mnn.LearnableScaleCrossAttention(-4),
        ValueError,
        r"dim must be positive",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "shape",
        "features with another C",
        lambda: _sap()(r(2, 4, 5, 5)),
        ValueError,
        r"features must be \[B, 3, H, W\]",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "shape",
        "mask with another B",
        lambda: _sap()(r(2, 3, 5, 5), m(3, 5, 5)),
        ValueError,
        r"mask must be \[B, H, W\] with B = 2",
    ),
    Case(
        "nn.SpatialAttentionPool",
        "size",
        "negative channels",
        lambda: mnn.SpatialAttentionPool(-3),
        ValueError,
        r"SpatialAttentionPool: channels must be positive, got -3",
    ),
    Case(
        "nn.prepend_condition_mask",
        "size",
        "negative num_condition_tokens",
        lambda: mnn.prepend_condition_mask(m(2, 3), -1),
        ValueError,
        r"num_condition_tokens must be >= 0",
    ),
    Case(
        "nn.AttentionPooling",
        "value",
        "dropout = 1",
        lambda: mnn.AttentionPooling(4, dropout=1.0),
        ValueError,
        r"AttentionPooling: dropout must be in \[0.0, 1.0\), got 1.0",
    ),
    Case(
        "nn.AttentionPooling",
        "value",
        "dropout NaN",
        lambda: mnn.AttentionPooling(4, dropout=float("nan")),
        ValueError,
        r"AttentionPooling: dropout must be in \[0.0, 1.0\), got nan",
    ),
    Case(
        "nn.AttentionPooling",
        "value",
        "negative dropout",
        lambda: mnn.AttentionPooling(4, dropout=-0.1),
        ValueError,
        r"AttentionPooling: dropout must be in \[0.0, 1.0\), got -0.1",
    ),
    Case(
        "nn.AttentionPooling",
        "type",
        "float in_dim",
        lambda: mnn.AttentionPooling(4.0),
        TypeError,
        r"AttentionPooling: in_dim must be an int, got 4.0",
    ),
    Case(
        "nn.AttentionPooling",
        "type",
        "bool hidden_dim",
        lambda: mnn.AttentionPooling(4, hidden_dim=True),
        TypeError,
        r"AttentionPooling: hidden_dim must be an int, got True",
    ),
    Case(
        "nn.AttentionPooling",
        "type",
        "string branches",
        lambda: mnn.AttentionPooling(4, branches="2"),
        TypeError,
        r"AttentionPooling: branches must be an int, got '2'",
    ),
    Case(
        "nn.AttentionPooling",
        "size",
        "branches 0",
        lambda: mnn.AttentionPooling(4, branches=0),
        ValueError,
        r"AttentionPooling: branches must be positive, got 0",
    ),
    Case(
        "nn.AttentionPooling",
        "type",
        "gated a string",
        lambda: mnn.AttentionPooling(4, gated="no"),
        TypeError,
        r"AttentionPooling: gated must be a bool, got 'no'",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "dtype",
        "integer features",
        lambda: _pool_module()(r(2, 3, 4, dtype=I64)),
        TypeError,
        r"AttentionPooling: features must be a float32, float64, float16 or bfloat16 tensor, got int64",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "type",
        "features a list",
        lambda: _pool_module()([[1.0] * 4]),
        TypeError,
        r"AttentionPooling: features must be a tensor, got list",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "dtype",
        "complex mask",
        lambda: _pool_module()(r(2, 3, 4), torch.ones(2, 3, dtype=torch.complex64)),
        MASK_DTYPE,
        r"AttentionPooling: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.AttentionPooling.forward",
        "device",
        "mask on another device than features",
        lambda: _pool_module()(r(2, 3, 4), m(2, 3, device=OTHER)),
        RuntimeError,
        r"mask \(.*\) and features \(.*\) must be on the same device",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "value",
        "attn_drop > 1",
        lambda: mnn.MaskedSelfAttention(8, num_heads=2, attn_drop=1.5),
        ValueError,
        r"MaskedSelfAttention: attn_drop must be in \[0.0, 1.0\), got 1.5",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "value",
        "proj_drop NaN",
        lambda: mnn.MaskedSelfAttention(8, num_heads=2, proj_drop=float("nan")),
        ValueError,
        r"MaskedSelfAttention: proj_drop must be in \[0.0, 1.0\), got nan",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "type",
        "float dim",
        lambda: mnn.MaskedSelfAttention(8.0, num_heads=2),
        TypeError,
        r"MaskedSelfAttention: dim must be an int, got 8.0",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "type",
        "string num_heads",
        lambda: mnn.MaskedSelfAttention(8, num_heads="2"),
        TypeError,
        r"MaskedSelfAttention: num_heads must be an int, got '2'",
    ),
    Case(
        "nn.MaskedSelfAttention",
        "type",
        "qkv_bias a string",
        lambda: mnn.MaskedSelfAttention(8, num_heads=2, qkv_bias="False"),
        TypeError,
        r"MaskedSelfAttention: qkv_bias must be a bool, got 'False'",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "rank",
        "0-d x",
        lambda: _msa()(r()),
        ValueError,
        r"MaskedSelfAttention: x must be \[B, N, 8\], got shape \(\)",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "dtype",
        "integer x",
        lambda: _msa()(r(2, 3, 8, dtype=I64)),
        TypeError,
        r"MaskedSelfAttention: x must be a float32, float64, float16 or bfloat16 tensor, got int64",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "dtype",
        "complex mask",
        lambda: _msa()(r(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.complex64)),
        MASK_DTYPE,
        r"MaskedSelfAttention: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.MaskedSelfAttention.forward",
        "dtype",
        "complex key_padding_mask",
        lambda: _msa()(r(2, 3, 8), key_padding_mask=torch.zeros(2, 3, dtype=torch.complex64)),
        MASK_DTYPE,
        r"MaskedSelfAttention: key_padding_mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.prepend_condition_mask",
        "type",
        "float num_condition_tokens",
        lambda: mnn.prepend_condition_mask(m(2, 3), 1.0),
        TypeError,
        r"prepend_condition_mask: num_condition_tokens must be an int, got 1.0",
    ),
    Case(
        "nn.prepend_condition_mask",
        "dtype",
        "complex mask",
        lambda: mnn.prepend_condition_mask(torch.ones(2, 3, dtype=torch.complex64), 1),
        MASK_DTYPE,
        r"prepend_condition_mask: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.prepend_condition_mask",
        "rank",
        "mask 1-D",
        lambda: mnn.prepend_condition_mask(m(3), 1),
        ValueError,
        r"prepend_condition_mask: mask must be \[B, N\], got shape \(3,\)",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "value",
        "init_scale NaN",
        lambda: mnn.LearnableScaleCrossAttention(4, init_scale=float("nan")),
        ValueError,
        r"LearnableScaleCrossAttention: init_scale must be > 0.0 and finite, got nan",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "value",
        "init_scale inf",
        lambda: mnn.LearnableScaleCrossAttention(4, init_scale=float("inf")),
        ValueError,
        r"LearnableScaleCrossAttention: init_scale must be > 0.0 and finite, got inf",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "value",
        "max_scale NaN",
        lambda: mnn.LearnableScaleCrossAttention(4, max_scale=float("nan")),
        ValueError,
        r"LearnableScaleCrossAttention: max_scale must be > 0.0, got nan",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "value",
        "max_scale 0",
        lambda: mnn.LearnableScaleCrossAttention(4, max_scale=0),
        ValueError,
        r"LearnableScaleCrossAttention: max_scale must be > 0.0, got 0.0",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "type",
        "float dim",
        lambda: mnn.LearnableScaleCrossAttention(4.5),
        TypeError,
        r"LearnableScaleCrossAttention: dim must be an int, got 4.5",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "type",
        "init_scale a string",
        lambda: mnn.LearnableScaleCrossAttention(4, init_scale="25"),
        TypeError,
        r"LearnableScaleCrossAttention: init_scale must be a number, got '25'",
    ),
    Case(
        "nn.LearnableScaleCrossAttention",
        "type",
        "normalize a string",
        lambda: mnn.LearnableScaleCrossAttention(4, normalize="yes"),
        TypeError,
        r"LearnableScaleCrossAttention: normalize must be a bool, got 'yes'",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "rank",
        "0-d query",
        lambda: _lsca()(r(), r(6, 4)),
        ValueError,
        r"LearnableScaleCrossAttention: query must be \[B, Lq, 4\] or \[B, 4\], got shape \(\)",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "rank",
        "prototypes 1-D",
        lambda: _lsca()(r(2, 4), r(4)),
        ValueError,
        r"LearnableScaleCrossAttention: prototypes must be \[Lk, 4\] or \[B, Lk, 4\], got shape \(4,\)",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "dtype",
        "integer query",
        lambda: _lsca()(r(2, 4, dtype=I64), r(6, 4)),
        TypeError,
        r"LearnableScaleCrossAttention: query must be a float32, float64, float16 or bfloat16 tensor, got int64",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "dtype",
        "integer values",
        lambda: _lsca()(r(2, 4), r(6, 4), r(6, 3, dtype=I64)),
        TypeError,
        r"LearnableScaleCrossAttention: values must be a float32",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "dtype",
        "complex key_mask",
        lambda: _lsca()(r(2, 4), r(6, 4), key_mask=torch.ones(6, dtype=torch.complex64)),
        MASK_DTYPE,
        r"LearnableScaleCrossAttention: key_mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.LearnableScaleCrossAttention.forward",
        "device",
        "key_mask on another device than query",
        lambda: _lsca()(r(2, 4), r(6, 4), key_mask=m(6, device=OTHER)),
        RuntimeError,
        r"key_mask \(.*\) and query \(.*\) must be on the same device",
    ),
    Case(
        "nn.SpatialAttentionPool",
        "value",
        "mask_threshold NaN",
        lambda: mnn.SpatialAttentionPool(3, mask_threshold=float("nan")),
        ValueError,
        r"SpatialAttentionPool: mask_threshold must be in \[0.0, 1.0\], got nan",
    ),
    Case(
        "nn.SpatialAttentionPool",
        "value",
        "mask_threshold > 1",
        lambda: mnn.SpatialAttentionPool(3, mask_threshold=1.5),
        ValueError,
        r"SpatialAttentionPool: mask_threshold must be in \[0.0, 1.0\], got 1.5",
    ),
    Case(
        "nn.SpatialAttentionPool",
        "type",
        "float channels",
        lambda: mnn.SpatialAttentionPool(3.0),
        TypeError,
        r"SpatialAttentionPool: channels must be an int, got 3.0",
    ),
    Case(
        "nn.SpatialAttentionPool",
        "size",
        "hidden 0",
        lambda: mnn.SpatialAttentionPool(3, hidden=0),
        ValueError,
        r"SpatialAttentionPool: hidden must be positive, got 0",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "dtype",
        "integer features",
        lambda: _sap()(r(2, 3, 5, 5, dtype=I64)),
        TypeError,
        r"SpatialAttentionPool: features must be a float32, float64, float16 or bfloat16 tensor, got int64",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "dtype",
        "complex mask",
        lambda: _sap()(r(2, 3, 5, 5), torch.ones(2, 5, 5, dtype=torch.complex64)),
        MASK_DTYPE,
        r"SpatialAttentionPool: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "device",
        "mask on another device than features",
        lambda: _sap()(r(2, 3, 5, 5), m(2, 5, 5, device=OTHER)),
        ValueError,
        r"SpatialAttentionPool: mask \(meta\) and features \(cpu\) must be on the same device",
    ),
    Case(
        "nn.SpatialAttentionPool.forward",
        "shape",
        "mask smaller than the features",
        lambda: _sap()(r(2, 3, 5, 5), m(2, 4, 8)),
        ValueError,
        r"SpatialAttentionPool: mask \(2, 4, 8\) is neither at feature resolution \(5, 5\) nor larger",
    ),
    # ---- masks
    Case(
        "masks.ellipse",
        "size",
        "negative h",
        lambda: masks.ellipse(-4, 4),
        ValueError,
        r"h and w must be non-negative ints",
    ),
    Case(
        "masks.ellipse",
        "dtype",
        "float w",
        lambda: masks.ellipse(4, 4.5),
        ValueError,
        r"h and w must be non-negative ints",
    ),
    Case(
        "masks.ellipse",
        "value",
        "negative ax",
        lambda: masks.ellipse(4, 4, ax=-0.1),
        ValueError,
        r"ax must be a positive finite number",
    ),
    Case(
        "masks.rectangle",
        "size",
        "negative w",
        lambda: masks.rectangle(4, -4),
        ValueError,
        r"h and w must be non-negative ints",
    ),
    Case(
        "masks.rectangle",
        "value",
        "fy = inf",
        lambda: masks.rectangle(4, 4, fy=float("inf")),
        ValueError,
        r"fy must be a positive finite number",
    ),
    Case(
        "masks.adaptive",
        "size",
        "negative h",
        lambda: masks.adaptive(-4, 4),
        ValueError,
        r"h and w must be non-negative",
    ),
    Case(
        "masks.geometric",
        "value",
        "unknown kind",
        lambda: masks.geometric("circle", 4, 4),
        ValueError,
        r"kind must be one of",
    ),
    Case(
        "masks.content_based",
        "rank",
        "images 2-D",
        lambda: masks.content_based(r(4, 4)),
        ValueError,
        r"images must be a \[B, C, H, W\] or \[B, H, W\] tensor",
    ),
    Case(
        "masks.content_based",
        "value",
        "min_coverage > max_coverage",
        lambda: masks.content_based(r(1, 4, 4), min_coverage=0.9, max_coverage=0.1),
        ValueError,
        r"min_coverage <= max_coverage",
    ),
    Case(
        "masks.content_based",
        "shape",
        "fallback of another H, W",
        lambda: masks.content_based(r(1, 4, 4), fallback=r(5, 5)),
        ValueError,
        r"fallback must be \[H, W\]",
    ),
    Case(
        "masks.content_based",
        "size",
        "negative open_radius",
        lambda: masks.content_based(r(1, 4, 4), open_radius=-1),
        ValueError,
        r"content_based: open_radius must be >= 0, got -1",
    ),
    Case(
        "masks.ellipse",
        "type",
        "bool h",
        lambda: masks.ellipse(True, 4),
        ValueError,
        r"h and w must be non-negative ints, got h=True",
    ),
    Case(
        "masks.adaptive",
        "value",
        "extension NaN",
        lambda: masks.adaptive(4, 4, extension=float("nan")),
        ValueError,
        r"extension must be in \[0, 1\], got nan",
    ),
    Case(
        "masks.geometric",
        "type",
        "kind not a string",
        lambda: masks.geometric(None, 4, 4),
        ValueError,
        r"kind must be one of",
    ),
    Case(
        "masks.content_based",
        "value",
        "threshold NaN",
        lambda: masks.content_based(r(1, 4, 4), threshold=float("nan")),
        ValueError,
        r"content_based: threshold must be finite, got nan",
    ),
    Case(
        "masks.content_based",
        "value",
        "negative sigma",
        lambda: masks.content_based(r(1, 4, 4), sigma=-1.0),
        ValueError,
        r"content_based: sigma must be >= 0.0 and finite, got -1.0",
    ),
    Case(
        "masks.content_based",
        "type",
        "float open_radius",
        lambda: masks.content_based(r(1, 4, 4), open_radius=1.5),
        TypeError,
        r"content_based: open_radius must be an int, got 1.5",
    ),
    Case(
        "masks.content_based",
        "value",
        "min_coverage NaN",
        lambda: masks.content_based(r(1, 4, 4), min_coverage=float("nan")),
        ValueError,
        r"content_based: min_coverage must be in \[0.0, 1.0\], got nan",
    ),
    Case(
        "masks.content_based",
        "value",
        "unknown fallback",
        lambda: masks.content_based(r(1, 4, 4), fallback="circle"),
        ValueError,
        r"content_based: fallback must be one of",
    ),
    Case(
        "masks.content_based",
        "dtype",
        "complex fallback",
        lambda: masks.content_based(r(1, 4, 4), fallback=torch.ones(4, 4, dtype=torch.complex64)),
        MASK_DTYPE,
        r"content_based: fallback must be a bool, integer or floating tensor, got complex64",
    ),
    # ---- masked_attention
    Case(
        "masked_attention",
        "shape",
        "mask not broadcastable to the scores",
        lambda: maskattn.masked_attention(r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), m(2, 2, 3, 5)),
        ValueError,
        r"mask of shape \(2, 2, 3, 5\) does not broadcast to the scores",
    ),
    Case(
        "masked_attention",
        "shape",
        "k with another head dim",
        lambda: maskattn.masked_attention(r(2, 2, 5, 4), r(2, 2, 5, 3), r(2, 2, 5, 4)),
        ValueError,
        r"q \[..., Lq, D\], k \[..., Lk, D\] and v \[..., Lk, Dv\] must share",
    ),
    Case(
        "masked_attention",
        "rank",
        "q 1-D",
        lambda: maskattn.masked_attention(r(4), r(2, 4), r(2, 4)),
        ValueError,
        r"q must be \[..., L, D\]",
    ),
    Case(
        "masked_attention",
        "dtype",
        "complex mask",
        lambda: maskattn.masked_attention(
            r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), torch.ones(2, 5, dtype=torch.complex64)
        ),
        TypeError,
        r"mask must be a real or bool tensor",
    ),
    Case(
        "masked_attention",
        "device",
        "mask on another device than q",
        lambda: maskattn.masked_attention(r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), m(2, 5, device=OTHER)),
        ValueError,
        r"mask \(.*\) and q \(.*\) must be on the same device",
    ),
    # ---- losses
    Case(
        "losses.masked_mse_loss",
        "shape",
        "pred and target shapes differ",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 5), m(2, 4, 4)),
        ValueError,
        r"pred .* and target .* must have the same shape",
    ),
    Case(
        "losses.masked_mse_loss",
        "rank",
        "pred 1-D",
        lambda: losses.masked_mse_loss(r(4), r(4), m(4)),
        ValueError,
        r"pred must be \[B, C, \.\.\.\]",
    ),
    Case(
        "losses.masked_mse_loss",
        "shape",
        "mask of another H, W",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 4), m(2, 4, 5)),
        ValueError,
        r"mask must be \[B, H, W\]",
    ),
    Case(
        "losses.masked_mse_loss",
        "value",
        "unknown reduction",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 4), m(2, 4, 4), reduction="max"),
        ValueError,
        r"reduction must be 'mean', 'pixel_mean', 'sum' or 'none'",
    ),
    Case(
        "losses.masked_mse_loss",
        "device",
        "mask on another device than pred",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 4), m(2, 4, 4, device=OTHER)),
        ValueError,
        r"mask \(.*\) and pred \(.*\) must be on the same device",
    ),
    Case(
        "losses.masked_mse_loss",
        "dtype",
        "integer pred",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4, dtype=I64), r(2, 3, 4, 4, dtype=I64), m(2, 4, 4)),
        TypeError,
        r"masked_mse_loss: pred must be a float32, float64, float16 or bfloat16 tensor, got int64",
    ),
    Case(
        "losses.masked_mse_loss",
        "dtype",
        "complex mask",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.complex64)),
        MASK_DTYPE,
        r"masked_mse_loss: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "losses.masked_mse_loss",
        "type",
        "mask a list",
        lambda: losses.masked_mse_loss(r(2, 3, 4, 4), r(2, 3, 4, 4), [[1]]),
        TypeError,
        r"masked_mse_loss: mask must be a tensor, got list",
    ),
    # ---- transforms
    Case(
        "transforms.FaceMask",
        "value",
        "unknown mask_type",
        lambda: transforms.FaceMask("circle"),
        ValueError,
        r"mask_type must be one of",
    ),
    Case(
        "transforms.FaceMask",
        "value",
        "content options with a geometric mask_type",
        lambda: transforms.FaceMask("ellipse", threshold=0.2),
        ValueError,
        r"only apply to mask_type='content_based'",
    ),
    Case(
        "transforms.FaceMask.__call__",
        "rank",
        "5-D tensor",
        lambda: transforms.FaceMask("ellipse")(r(1, 1, 1, 4, 4)),
        ValueError,
        r"tensor images must be \[H, W\], \[C, H, W\] or \[B, C, H, W\]",
    ),
    Case(
        "transforms.FaceMask.__call__",
        "dtype",
        "a list",
        lambda: transforms.FaceMask("ellipse")([[0.0]]),
        TypeError,
        r"expected a tensor, numpy array or PIL image",
    ),
    Case(
        "transforms.apply_face_mask",
        "dtype",
        "complex mask",
        lambda: transforms.apply_face_mask(r(1, 3, 4, 4), torch.ones(4, 4, dtype=torch.complex64)),
        MASK_DTYPE,
        r"apply_face_mask: mask must be a bool, integer or floating tensor, got complex64",
    ),
    Case(
        "transforms.apply_face_mask",
        "value",
        "background NaN",
        lambda: transforms.apply_face_mask(r(1, 3, 4, 4), m(4, 4), background=float("nan")),
        ValueError,
        r"apply_face_mask: background must be finite, got nan",
    ),
    Case(
        "transforms.FaceMask",
        "type",
        "background a string",
        lambda: transforms.FaceMask("ellipse", background="black"),
        TypeError,
        r"FaceMask: background must be a number, got 'black'",
    ),
    Case(
        "optim.param_groups",
        "type",
        "no_decay a string",
        lambda: optim.param_groups(_pool_module(), 0.1, no_decay="attention_net.0.bias"),
        TypeError,
        r"param_groups: no_decay must be a list of parameter names, got the string",
    ),
    Case(
        "optim.param_groups",
        "value",
        "weight_decay NaN",
        lambda: optim.param_groups(_pool_module(), float("nan")),
        ValueError,
        r"param_groups: weight_decay must be >= 0.0 and finite, got nan",
    ),
    Case(
        "optim.param_groups",
        "value",
        "negative weight_decay",
        lambda: optim.param_groups(_pool_module(), -0.1),
        ValueError,
        r"param_groups: weight_decay must be >= 0.0 and finite, got -0.1",
    ),
    Case(
        "optim.param_groups",
        "type",
        "model a list of parameters",
        lambda: optim.param_groups(list(_pool_module().parameters()), 0.1),
        TypeError,
        r"param_groups: model must be an nn.Module, got list",
    ),
]


def _id(c: Case) -> str:
    return f"{c.func}-{c.bad}".replace(" ", "_")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_rejects(case):
    if case.cuda and not HAS_CUDA:
        pytest.skip("needs CUDA")
    with pytest.raises(case.exc, match=case.match):
        case.call()


def test_every_public_function_has_a_case():
    # A new public function must come with error cases (or be listed here with the reason it has none).
    no_tensor_args = {"build_info", "cuda_available", "losses", "masks", "transforms", "nn", "optim"}
    names = {c.func.split(".")[0] for c in CASES}
    missing = [n for n in maskattn.__all__ if n not in no_tensor_args and n not in names]
    assert not missing, f"no error case for {missing}"
    for mod, prefix in ((losses, "losses"), (masks, "masks")):
        public = getattr(mod, "__all__", None) or [
            n
            for n, f in vars(mod).items()
            if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == mod.__name__
        ]
        for n in public:
            assert any(c.func == f"{prefix}.{n}" for c in CASES), f"no error case for {prefix}.{n}"
    for n in mnn.__all__:
        assert any(c.func.startswith(f"nn.{n}") for c in CASES), f"no error case for nn.{n}"


def test_every_category_is_covered():
    # Every category of bad input (rank, shape, dtype, device, ...), each exercised at least once.
    kinds = {c.kind for c in CASES}
    assert {"rank", "shape", "dtype", "device", "offsets", "size"} <= kinds


# ---- the docs table is generated from CASES


def _excname(exc) -> str:
    return " / ".join(e.__name__ for e in exc) if isinstance(exc, tuple) else exc.__name__


def _message(case: Case) -> str:
    try:
        case.call()
    except Exception as e:  # noqa: BLE001 - we document whatever it raises
        return str(e).splitlines()[0]
    return "(no error)"


def _excerpt(msg: str, limit: int = 110) -> str:
    msg = re.sub(r"\s+", " ", msg).strip()
    msg = msg if len(msg) <= limit else msg[: limit - 3] + "..."
    return msg.replace("|", "\\|").replace("`", "'")


def render_table() -> str:
    lines = [
        "| function | bad input | exception | message excerpt |",
        "| --- | --- | --- | --- |",
    ]
    for c in CASES:
        if c.cuda:
            msg = "(CUDA machines only) same message as the 'meta' case"
        else:
            msg = _excerpt(_message(c))
        lines.append(f"| `{c.func}` | {c.bad} | `{_excname(c.exc)}` | `{msg}` |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- BEGIN generated by tests/test_errors.py -->\n", "<!-- END generated -->\n"


def _normalise(table: str) -> str:
    # Device strings and shapes are stable, but torch may word its own part of a message
    # differently across versions: compare function, bad input and exception columns exactly and
    # only the start of each message.
    rows = []
    for line in table.strip().splitlines():
        cells = [x.strip() for x in line.strip("|").split(" | ")]
        if len(cells) == 4:
            cells[3] = cells[3][:40]
        rows.append(cells)
    return repr(rows)


def test_docs_table_matches_cases():
    with open(DOCS) as f:
        text = f.read()
    assert BEGIN in text and END in text, "docs/errors.md lost its generated-table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert _normalise(table) == _normalise(render_table()), (
        "docs/errors.md is out of date: run python tests/test_errors.py --write-docs"
    )


def write_docs() -> None:
    with open(DOCS) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOCS, "w") as f:
        f.write(head + BEGIN + render_table() + END + tail)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        write_docs()
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
