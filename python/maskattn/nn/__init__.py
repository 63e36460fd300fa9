"""nn.Module drop-ins for the hand-written masked-attention layers."""
from .attention_pooling import AttentionPooling
from .spatial_attention_pool import SpatialAttentionPool

__all__ = ["AttentionPooling"]
__all__ += ["SpatialAttentionPool"]
