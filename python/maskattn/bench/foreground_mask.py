"""Suite "foreground_mask": the thermal-face classifier's content-based face mask against maskattn.

masks.content_based (op foreground_mask) on a batch of synthetic thermal faces (black background,
salt noise, a dark hole, a separate blob) against the same pipeline written with OpenCV, image by
image, as that classifier's data loader runs it (same stages, same parameters). OpenCV is optional
(opencv-python-headless): the row is skipped, and says so, when cv2 is missing.
"""

import math
from typing import List

import torch

from ._harness import Row, timeit

SUITE = "foreground_mask"


# ---------------------------------------------------------------- synthetic data


def synthetic_faces(
    B: int,
    H: int = 256,
    W: int = 256,
    channels: int = 3,
    seed: int = 0,
    salt: float = 0.002,
    hole: bool = True,
    blob: bool = True,
    dtype: torch.dtype = torch.uint8,
):
    """Black-background face-like images ``[B, C, H, W]`` and their true face regions ``[B, H, W]``.

    Each face is an ellipse (random centre and size) warm in the middle; a dark disk inside it (a
    hole the mask must fill), a bright disk in the top-left corner (a blob the mask must drop) and
    isolated bright pixels anywhere (salt noise the opening must remove). The true region is the
    ellipse, hole included.
    """
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(H, dtype=torch.float32) + 0.5).view(H, 1)
    x = (torch.arange(W, dtype=torch.float32) + 0.5).view(1, W)
    imgs = torch.zeros(B, H, W)
    faces = torch.zeros(B, H, W, dtype=torch.bool)
    s = min(H, W)
    for b in range(B):
        u = torch.rand(6, generator=g)
        cx, cy = W * (0.5 + 0.06 * (u[0] - 0.5)), H * (0.5 + 0.06 * (u[1] - 0.5))
        ax, ay = W * (0.27 + 0.06 * u[2]), H * (0.32 + 0.06 * u[3])
        r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        face = r2 <= 1
        img = torch.where(face, 0.4 + 0.5 * (1 - r2).clamp(0, 1), torch.zeros(()))
        if hole:
            hr = max(3.0, 0.045 * s)
            hx, hy = cx + 0.35 * ax * (u[4] - 0.5), cy - 0.3 * ay
            img = torch.where((x - hx) ** 2 + (y - hy) ** 2 <= hr * hr, torch.zeros(()), img)
        if blob:
            br = max(3.0, 0.035 * s)
            img = torch.where((x - 0.09 * W) ** 2 + (y - 0.09 * H) ** 2 <= br * br, torch.full((), 0.8), img)
        if salt > 0:
            img = torch.where(torch.rand(H, W, generator=g) < salt, torch.ones(()), img)
        imgs[b] = img
        faces[b] = face
    tint = torch.tensor([1.0, 0.8, 0.5][:channels] if channels <= 3 else [1.0] * channels).view(1, channels, 1, 1)
    out = imgs.unsqueeze(1) * tint
    if dtype == torch.uint8:
        out = (out * 255).round().to(torch.uint8)
    else:
        out = out.to(dtype)
    return out, faces


# ---------------------------------------------------------------- OpenCV pipeline (the seed's way)


def opencv_content_mask(
    image,
    threshold: float = 0.1,
    open_radius: int = 1,
    close_radius: int = 2,
    fill_holes: bool = True,
    sigma: float = 1.0,
    min_coverage: float = 0.1,
    max_coverage: float = 0.8,
    fallback=None,
):
    """Seed 004's generate_smart_face_mask for one ``[H, W]`` or ``[H, W, 3]`` uint8 ndarray, in OpenCV.

    Returns ``(soft mask float32 [H, W], coverage, accepted)``; ``fallback`` ([H, W] ndarray) replaces
    a rejected mask when given.
    """
    import cv2
    import numpy as np

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    # gray > threshold * 255; for uint8 cv2 floors the threshold, which is the same test.
    _, binary = cv2.threshold(gray, threshold * 255.0, 1, cv2.THRESH_BINARY)
    if open_radius > 0:
        k = np.ones((2 * open_radius + 1, 2 * open_radius + 1), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, k)
    if close_radius > 0:
        k = np.ones((2 * close_radius + 1, 2 * close_radius + 1), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, k)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n > 1:
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        comp = (labels == largest).astype(np.uint8)
    else:
        comp = np.zeros_like(binary)
    if fill_holes:
        # Flood the background from outside a one-pixel frame; what stays unreached is a hole.
        h, w = comp.shape
        framed = np.zeros((h + 2, w + 2), np.uint8)
        framed[1:-1, 1:-1] = comp
        cv2.floodFill(framed, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2, flags=4)
        comp = (framed[1:-1, 1:-1] != 2).astype(np.uint8)
    coverage = float(comp.mean())
    if sigma > 0:
        r = math.ceil(3 * sigma)
        soft = cv2.GaussianBlur(comp.astype(np.float32), (2 * r + 1, 2 * r + 1), sigma)
    else:
        soft = comp.astype(np.float32)
    accepted = min_coverage <= coverage <= max_coverage
    if not accepted and fallback is not None:
        soft = fallback
    return soft, coverage, accepted


def _have_cv2() -> bool:
    try:
        import cv2  # noqa: F401

        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- suite


def _timeit_threads(n: int, fn, device, min_time) -> float:
    # Thread count set around the timing, not inside it: set_num_threads is not free.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return timeit(fn, device, min_time)
    finally:
        torch.set_num_threads(old)


def _mask_rows(args) -> List[Row]:
    import maskattn

    rows: List[Row] = []
    dev = args.device
    B, S = (8, 128) if args.quick else (64, 256)
    imgs, _ = synthetic_faces(B, S, S, channels=3, seed=1)
    case = f"B={B} {S}x{S} rgb uint8"
    mode = "content_based mask"
    nthreads = torch.get_num_threads()
    if _have_cv2() and dev.type == "cpu":
        import cv2
        import numpy as np

        cv2.setNumThreads(1)  # the seed's loader runs one image per call; OpenCV's own threads off
        hwc = [np.ascontiguousarray(imgs[b].permute(1, 2, 0).numpy()) for b in range(B)]
        fb = maskattn.masks.ellipse(S, S).numpy()
        t = timeit(lambda: [opencv_content_mask(im, fallback=fb) for im in hwc], dev, args.min_time)
        rows.append(Row(SUITE, case, mode, "seed eager", t * 1e3, notes="OpenCV per image, 1 thread"))
    else:
        rows.append(
            Row(
                SUITE,
                case,
                mode,
                "seed eager (skipped)",
                float("nan"),
                notes="opencv-python-headless not installed" if dev.type == "cpu" else "OpenCV is CPU-only",
            )
        )
    x = imgs.to(dev)
    if dev.type == "cpu":
        t1 = _timeit_threads(1, lambda: maskattn.masks.content_based(x), dev, args.min_time)
        rows.append(Row(SUITE, case, mode, "maskattn, 1 thread", t1 * 1e3, notes=f"{t1 * 1e6 / B:.0f} us/image"))
        tn = timeit(lambda: maskattn.masks.content_based(x), dev, args.min_time)
        rows.append(
            Row(SUITE, case, mode, f"maskattn, {nthreads} threads", tn * 1e3, notes=f"{tn * 1e6 / B:.0f} us/image")
        )
        one = [x[b : b + 1] for b in range(B)]
        tp = _timeit_threads(1, lambda: [maskattn.masks.content_based(o) for o in one], dev, args.min_time)
        rows.append(
            Row(
                SUITE,
                case,
                mode,
                "maskattn, per-image calls",
                tp * 1e3,
                notes="1 thread, B calls of B=1 (data-loader use)",
            )
        )
    else:
        t = timeit(lambda: maskattn.masks.content_based(x), dev, args.min_time)
        rows.append(Row(SUITE, case, mode, "maskattn", t * 1e3, notes="CC stage on a host copy"))
    return rows


def run(args) -> List[Row]:
    return _mask_rows(args)
