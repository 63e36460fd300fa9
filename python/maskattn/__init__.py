"""maskattn: fused masked-attention operators for padded batches.

Every op is registered as ``torch.ops.maskattn.<name>`` (autograd, fake kernels, torch.compile);
the functions here are thin, documented wrappers around them.
"""
from ._loader import build_info, cuda_available  # noqa: F401  (loads the compiled ops first)
from ._ops.masked_attention_pool import masked_attention_pool, masked_attention_pool_packed
from ._padding import pack, pad_sequences, unpack
from ._ops.scaled_cross_attention import scaled_cross_attention
from . import optim  # noqa: E402
from . import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "cuda_available",
    "masked_attention_pool",
    "masked_attention_pool_packed",
    "pack",
    "pad_sequences",
    "unpack",
    "nn",
    "scaled_cross_attention",
    "optim",
]
