"""Face masks for a thermal-face classifier: content-based masks for a batch of
synthetic faces (noise, a dark hole, a stray blob, one blank frame that falls back to the ellipse),
the geometric masks, and masked spatial-attention pooling. Writes face_masks.png when matplotlib
is installed.

    python examples/face_masks.py
"""

import os
import time

import torch

import maskattn
from maskattn.bench.foreground_mask import synthetic_faces

SMOKE = os.environ.get("MASKATTN_SMOKE") == "1"


def main():
    B = 8 if SMOKE else 64
    images, truth = synthetic_faces(B, 224, 224)  # uint8 [B,3,H,W] on black, and the true face regions
    images[0] = 0  # a blank frame: coverage check -> ellipse fallback
    t0 = time.perf_counter()
    masks, coverage, accepted = maskattn.masks.content_based(images, return_info=True)
    dt = time.perf_counter() - t0
    print(f"content_based on {B} images of 224x224: {dt * 1e3:.1f} ms ({dt / B * 1e6:.0f} us/image)")
    print(
        "coverage of the first 4:",
        [round(float(c), 3) for c in coverage[:4]],
        "accepted:",
        accepted[:4].tolist(),
        "(image 0 is blank: ellipse fallback)",
    )
    iou = [
        float(((masks[i] > 0.5) & truth[i].bool()).sum() / ((masks[i] > 0.5) | truth[i].bool()).sum())
        for i in range(1, B)
    ]
    print(f"IoU with the true face regions: min {min(iou):.3f}, mean {sum(iou) / len(iou):.3f}")
    geo = {k: getattr(maskattn.masks, k)(224, 224) for k in ("ellipse", "rectangle", "adaptive")}
    for k, m in geo.items():
        print(f"{k:9s} coverage {float(m.float().mean()):.3f}")

    # masked spatial attention pooling on (fake) backbone features at 7x7
    pool = maskattn.nn.SpatialAttentionPool(64, hidden=32)
    feats = torch.randn(B, 64, 7, 7, requires_grad=True)
    pooled, attention = pool(feats, mask=masks)  # image-resolution mask, reduced by area
    pooled.sum().backward()
    print(
        "pooled",
        tuple(pooled.shape),
        "attention",
        tuple(attention.shape),
        "finite grads:",
        bool(torch.isfinite(feats.grad).all()),
    )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no face_masks.png written (pip install matplotlib)")
        return
    n = 4
    fig, axes = plt.subplots(3, n + 1, figsize=(2 * (n + 1), 6))
    for i in range(n):
        axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(masks[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2, i].imshow((images[i].float() * masks[i]).permute(1, 2, 0).numpy() / 255)
    for j, (k, m) in enumerate(geo.items()):
        axes[j, n].imshow(m.float().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[j, n].set_title(k, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("image", fontsize=8)
    axes[1, 0].set_title("content_based", fontsize=8)
    axes[2, 0].set_title("masked", fontsize=8)
    fig.tight_layout()
    fig.savefig("face_masks.png", dpi=90)
    print("wrote face_masks.png")


if __name__ == "__main__":
    main()
