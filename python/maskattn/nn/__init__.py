"""nn.Module drop-ins for the hand-written masked-attention layers."""
from .attention_pooling import AttentionPooling
from .masked_self_attention import MaskedSelfAttention, prepend_condition_mask
from .spatial_attention_pool import SpatialAttentionPool

__all__ = ["AttentionPooling", "MaskedSelfAttention", "prepend_condition_mask", "SpatialAttentionPool"]
