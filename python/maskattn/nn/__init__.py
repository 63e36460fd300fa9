"""nn.Module drop-ins for the hand-written masked-attention layers."""
from .attention_pooling import AttentionPooling
from .masked_self_attention import MaskedSelfAttention, prepend_condition_mask

__all__ = ["AttentionPooling"]
__all__ += ["MaskedSelfAttention", "prepend_condition_mask"]
