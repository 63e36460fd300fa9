"""nn.Module drop-ins for the hand-written masked-attention layers."""
from .attention_pooling import AttentionPooling
from .learnable_scale_cross_attention import LearnableScaleCrossAttention

__all__ = ["AttentionPooling"]
__all__ += ["LearnableScaleCrossAttention"]
