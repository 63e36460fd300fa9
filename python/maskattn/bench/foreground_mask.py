"""The thermal-face classifier's content-based face mask (OpenCV, per image) against maskattn.

masks.content_based (op foreground_mask) on a batch of synthetic thermal faces (black background,
salt noise, a dark hole, a separate blob) against the same pipeline written with OpenCV, image by
image, as that classifier's data loader runs it (same stages, same parameters). OpenCV is optional
(opencv-python-headless): without it the baseline row says so and the summary gives no verdict.
"""

import math

import torch

from ._harness import BASELINE, MASKATTN, VARIANT, Case, Impl, Layer

LAYER = Layer("thermal-face content-based face mask (OpenCV per image)", "maskattn.masks.content_based")


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


# ---------------------------------------------------------------- the OpenCV pipeline it replaces


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
    """The thermal-face classifier's generate_smart_face_mask for one ``[H, W]`` or ``[H, W, 3]`` uint8 ndarray, in OpenCV.

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


def cases(args):
    import maskattn

    dev = args.device
    B, S = (8, 128) if args.quick else (64, 256)
    imgs, _ = synthetic_faces(B, S, S, channels=3, seed=1)
    case = f"B={B} {S}x{S} rgb uint8"
    nthreads = torch.get_num_threads()
    baseline = "OpenCV face mask per image, 1 thread"
    if dev.type != "cpu":
        impls = [Impl(baseline, None, BASELINE, note="OpenCV is CPU-only")]
    elif not _have_cv2():
        impls = [Impl(baseline, None, BASELINE, note="opencv-python-headless not installed")]
    else:
        import cv2
        import numpy as np

        hwc = [np.ascontiguousarray(imgs[b].permute(1, 2, 0).numpy()) for b in range(B)]
        fb = maskattn.masks.ellipse(S, S).numpy()

        def opencv_batch():
            # the classifier's loader runs one image per call with OpenCV's own threads off
            old = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                return [opencv_content_mask(im, fallback=fb) for im in hwc]
            finally:
                cv2.setNumThreads(old)

        impls = [Impl(baseline, opencv_batch, BASELINE)]
    x = imgs.to(dev)
    if dev.type == "cpu":
        one = [x[b : b + 1] for b in range(B)]
        # The like-for-like replacement in a data loader: one image per call, one thread.
        impls.append(
            Impl(
                "maskattn.masks.content_based per image, 1 thread",
                lambda: [maskattn.masks.content_based(o) for o in one],
                MASKATTN,
                threads=1,
            )
        )
        impls.append(
            Impl(
                "maskattn.masks.content_based batched, 1 thread",
                lambda: maskattn.masks.content_based(x),
                VARIANT,
                threads=1,
            )
        )
        if nthreads > 1:
            impls.append(
                Impl(
                    f"maskattn.masks.content_based batched, {nthreads} threads",
                    lambda: maskattn.masks.content_based(x),
                    VARIANT,
                )
            )
    else:
        impls.append(
            Impl(
                "maskattn.masks.content_based batched",
                lambda: maskattn.masks.content_based(x),
                MASKATTN,
                note="CC stage on a host copy",
            )
        )
    yield Case(LAYER, case, "fwd", impls, detail=f"{B} masks")
