"""Pure-PyTorch references for gated_masked_mean: the thermal-face classifier's spatial-attention gate
(``attention_conv`` + global average pooling, as that model's forward writes it) and an unfused
masked variant."""

import torch
from torch import nn


class ThermalFaceSpatialAttention(nn.Module):
    """The thermal-face classifier: ``attention = attention_conv(features); pooled = avgpool(features * attention)``."""

    def __init__(self, channels: int = 512, hidden: int = 256):
        super().__init__()
        self.attention_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.Sigmoid(),  # 0-1 attention weights
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, features):
        attention_weights = self.attention_conv(features)
        features = features * attention_weights
        pooled = self.global_pool(features).flatten(1)
        return pooled, attention_weights


def reference_gated_masked_mean(features, gate_logits, mask=None):
    """Unfused reference of gated_masked_mean in float64-friendly ops."""
    g = torch.sigmoid(gate_logits.reshape(features.shape[0], 1, *features.shape[2:]))
    if mask is None:
        return (features * g).mean((2, 3)), g.reshape(gate_logits.shape)
    m = (mask != 0).to(features.dtype).unsqueeze(1)
    g = g * m
    n = m.sum((2, 3))
    pooled = torch.where(n > 0, (features * g).sum((2, 3)) / n.clamp_min(1), torch.zeros_like(n))
    return pooled, g.reshape(gate_logits.shape)
