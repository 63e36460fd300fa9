"""maskattn: fused masked-attention operators for padded batches.

Every op is registered as ``torch.ops.maskattn.<name>`` (autograd, fake kernels, torch.compile);
the functions here are thin, documented wrappers around them.
"""

# isort: off
# The loader must run first: it loads the compiled library that defines torch.ops.maskattn.*,
# which every module below registers fake kernels and autograd for.
from ._loader import build_info, cuda_available

# isort: on
from . import data, distributed, losses, masks, nn, optim, transforms
from ._attention import masked_attention
from ._chunked import (
    attention_pool_merge,
    attention_pool_partial,
    attention_pool_partial_packed,
    attention_pool_weights,
    chunked_attention_pool,
)
from ._ops.foreground_mask import foreground_mask
from ._ops.gated_attention_scores import gated_attention_scores
from ._ops.gated_masked_mean import gated_masked_mean
from ._ops.masked_attention_pool import masked_attention_pool, masked_attention_pool_packed
from ._ops.masked_channel_attention_pool import masked_channel_attention_pool, masked_channel_attention_pool_packed
from ._ops.masked_softmax import masked_softmax
from ._ops.patch_mask import patch_mask, patch_mask_to_image
from ._ops.scaled_cross_attention import scaled_cross_attention
from ._padding import pack, pad_sequences, unpack
from ._segments import SortedByBatch as SortedByBatch  # the return types, for annotations
from ._segments import batch_from_offsets, offsets_from_batch, sort_by_batch
from ._topk import TopKPerBag as TopKPerBag
from ._topk import topk_per_bag

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "cuda_available",
    "masked_attention_pool",
    "masked_attention_pool_packed",
    "masked_channel_attention_pool",
    "masked_channel_attention_pool_packed",
    "attention_pool_partial",
    "attention_pool_partial_packed",
    "attention_pool_merge",
    "attention_pool_weights",
    "chunked_attention_pool",
    "distributed",
    "pack",
    "pad_sequences",
    "unpack",
    "offsets_from_batch",
    "batch_from_offsets",
    "sort_by_batch",
    "topk_per_bag",
    "data",
    "patch_mask",
    "patch_mask_to_image",
    "masked_softmax",
    "masked_attention",
    "gated_attention_scores",
    "gated_masked_mean",
    "foreground_mask",
    "losses",
    "masks",
    "transforms",
    "nn",
    "scaled_cross_attention",
    "optim",
]
