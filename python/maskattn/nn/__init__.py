"""nn.Module drop-ins for the hand-written masked-attention layers."""

from . import convert
from .attention_pooling import AttentionPooling
from .learnable_scale_cross_attention import LearnableScaleCrossAttention
from .masked_self_attention import MaskedSelfAttention, prepend_condition_mask
from .packed_blocks import PackedBlocks, packed_forward
from .spatial_attention_pool import SpatialAttentionPool

__all__ = [
    "AttentionPooling",
    "convert",
    "LearnableScaleCrossAttention",
    "MaskedSelfAttention",
    "PackedBlocks",
    "packed_forward",
    "prepend_condition_mask",
    "SpatialAttentionPool",
]
