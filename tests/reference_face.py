"""Pure-PyTorch transcriptions of seed 004 (thermal-face classifier) used as test references.

- ``SeedSpatialAttention``: the seed's ``attention_conv`` gate applied to ResNet features, then
  global average pooling, exactly as the seed's forward does it (and a masked variant).
- ``reference_content_mask``: the seed's content-based mask written with dense tensor ops
  (max-pool morphology, label propagation for connected components, flood fill for holes,
  reflect-padded Gaussian), sharing no code with the C++ kernels.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SeedSpatialAttention(nn.Module):
    """Seed 004: ``attention = attention_conv(features); pooled = avgpool(features * attention)``."""

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


def _grey(images):
    x = images.to(torch.float64)
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    if x.dim() == 3:
        return x / scale
    C = x.shape[1]
    if C == 1:
        g = x[:, 0]
    elif C in (3, 4):
        g = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    else:
        g = x.mean(1)
    return g / scale


def _dilate(b, r):
    if r == 0:
        return b
    return F.max_pool2d(b.unsqueeze(1), 2 * r + 1, 1, r).squeeze(1)


def _erode(b, r):
    if r == 0:
        return b
    return -F.max_pool2d(-b.unsqueeze(1), 2 * r + 1, 1, r).squeeze(1)


def largest_component(b):
    """Largest 8-connected component of a float 0/1 [B,H,W] batch, by label propagation.

    Ties are broken by the component met first in raster order (as cv2 and the kernel do).
    """
    B, H, W = b.shape
    idx = torch.arange(H * W, 0, -1, dtype=torch.float64).view(1, H, W).expand(B, H, W)
    lab = torch.where(b > 0, idx, torch.zeros_like(idx))  # larger label = earlier in raster order
    while True:
        nxt = F.max_pool2d(lab.unsqueeze(1), 3, 1, 1).squeeze(1) * (b > 0)
        if torch.equal(nxt, lab):
            break
        lab = nxt
    out = torch.zeros_like(b)
    for i in range(B):
        labels = lab[i][lab[i] > 0]
        if labels.numel() == 0:
            continue
        vals, counts = labels.unique(return_counts=True)
        best = counts.max()
        winner = vals[counts == best].max()  # earliest first pixel
        out[i] = (lab[i] == winner).to(b.dtype)
    return out


def fill_holes(b):
    """Background regions of a 0/1 [B,H,W] batch not 4-connected to the border become 1."""
    B, H, W = b.shape
    bg = b == 0
    border = torch.zeros_like(bg)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    outside = bg & border
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    while True:
        grown = F.conv2d(outside.unsqueeze(1).to(torch.float64), cross, padding=1).squeeze(1) > 0
        nxt = grown & bg
        if torch.equal(nxt, outside):
            break
        outside = nxt
    return (~outside).to(b.dtype)


def gaussian(b, sigma):
    if sigma <= 0:
        return b.to(torch.float32)
    r = math.ceil(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    x = b.unsqueeze(1).to(torch.float64)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1).clamp(0, 1).to(torch.float32)


def reference_content_mask(images, threshold=0.1, open_radius=1, close_radius=2, fill=True, sigma=1.0):
    """(soft mask [B,H,W] float32, coverage [B] float32) without the fallback."""
    b = (_grey(images) > threshold).to(torch.float64)
    b = _dilate(_erode(b, open_radius), open_radius)
    b = _erode(_dilate(b, close_radius), close_radius)
    b = largest_component(b)
    if fill:
        b = fill_holes(b)
    coverage = b.mean((1, 2)).to(torch.float32)
    return gaussian(b, sigma), coverage
