"""A tiny pixel-space denoising transformer (JiT, the pixel diffusion transformer) on images of different
sizes padded into one batch: patch masks, always-valid condition tokens, masked self-attention and a
masked loss. The padding never produces NaN and never reaches the loss or the valid outputs.

    python examples/padded_images.py            # ~20 s on 2 CPU cores (OMP_NUM_THREADS=1 if busy)
    MASKATTN_SMOKE=1 python examples/padded_images.py
"""

import os
import time

import torch
from torch import nn

import maskattn

SMOKE = os.environ.get("MASKATTN_SMOKE") == "1"
P, DIM, HEADS, COND = 8, 96, 4, 2
torch.manual_seed(0)


def make_batch(B, size=64):
    """Smooth random images of random sizes, zero-padded to size x size, with their pixel masks."""
    imgs = torch.zeros(B, 3, size, size)
    mask = torch.zeros(B, size, size)
    for b in range(B):
        h, w = (int(torch.randint(size // 2, size + 1, ())) // P * P for _ in range(2))
        low = torch.randn(1, 3, 4, 4)
        imgs[b, :, :h, :w] = nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        mask[b, :h, :w] = 1
    return imgs, mask


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = maskattn.nn.MaskedSelfAttention(DIM, HEADS)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class TinyJiT(nn.Module):
    def __init__(self, size=64):
        super().__init__()
        self.size, self.n = size, size // P
        self.embed = nn.Linear(3 * P * P, DIM)
        self.cond = nn.Parameter(torch.zeros(1, COND, DIM))
        self.pos = nn.Parameter(torch.randn(1, self.n * self.n, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(DIM, 3 * P * P)

    def patchify(self, x):
        B = x.shape[0]
        return x.reshape(B, 3, self.n, P, self.n, P).permute(0, 2, 4, 1, 3, 5).reshape(B, self.n * self.n, -1)

    def unpatchify(self, t):
        B = t.shape[0]
        return t.reshape(B, self.n, self.n, 3, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, self.size, self.size)

    def forward(self, noisy, image_mask):
        B = noisy.shape[0]
        patch_mask = maskattn.patch_mask(image_mask, P)  # [B, n*n] bool
        tokens = torch.cat([self.cond.expand(B, -1, -1), self.embed(self.patchify(noisy)) + self.pos], 1)
        mask = maskattn.nn.prepend_condition_mask(patch_mask, COND)
        for blk in self.blocks:
            tokens = blk(tokens, mask)
        out = self.out(tokens[:, COND:]) * patch_mask.unsqueeze(-1)  # padding patches exactly 0
        return self.unpatchify(out)


def main():
    steps, B = (5, 4) if SMOKE else (150, 8)
    model = TinyJiT()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    first = None
    for step in range(steps):
        clean, mask = make_batch(B)
        noisy = (clean + 0.5 * torch.randn_like(clean)) * mask[:, None]
        pred = model(noisy, mask)
        loss = maskattn.losses.masked_mse_loss(pred, clean, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:3d}  masked MSE {loss.item():.4f}")
    print(f"{steps} steps in {time.perf_counter() - t0:.1f} s; loss {first:.3f} -> {loss.item():.3f}")
    # padding never matters: fill it with garbage and the valid outputs stay put
    clean, mask = make_batch(2)
    with torch.no_grad():
        a = model(clean * mask[:, None], mask)
        b = model(torch.where(mask[:, None] > 0, clean, torch.full_like(clean, 1e4)), mask)
    pm = maskattn.patch_mask_to_image(maskattn.patch_mask(mask, P), P, (64, 64))
    print(
        "max change at valid pixels when the padding holds 1e4:", (a - b)[pm[:, None].expand_as(a)].abs().max().item()
    )
    if not SMOKE:
        assert loss.item() < first, "the denoiser should learn"


if __name__ == "__main__":
    main()
