"""nn.Module drop-ins for the hand-written masked-attention layers."""
from .attention_pooling import AttentionPooling

__all__ = ["AttentionPooling"]
