"""Pure-PyTorch reference for foreground_mask: the thermal-face classifier's content-based face mask
(threshold, opening, closing, largest 8-connected component, hole filling, Gaussian edges) written
with dense tensor ops (max-pool morphology, label propagation, flood fill, reflect-padded Gaussian),
sharing no code with the C++ kernels."""

import math

import torch
import torch.nn.functional as F


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
