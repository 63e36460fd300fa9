"""Argument checks shared by the fake (meta) kernels, worded as the C++ checks in csrc/common/stable.h.

The C++ checks only run in the CPU/CUDA kernels; a call that mixes a real device with 'meta', or a
torch.compile trace with FakeTensors on different devices, reaches the fake kernel instead, so the
fake kernels check devices too and give the same message. The backward ops' fakes check what their
C++ checks do on shapes and dtypes as well, so that a trace fails where the eager call would.
"""

import torch

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def same_device(a, an: str, b, bn: str) -> None:
    """``a`` and ``b`` (tensors, ``b`` may be None) on one device; ``an`` is prefixed with the op name."""
    if a is None or b is None:
        return
    torch._check(a.device == b.device, lambda: f"{an} ({a.device}) and {bn} ({b.device}) must be on the same device")


def same_dtype(op: str, a, an: str, b, bn: str) -> None:
    if a is None or b is None:
        return
    torch._check(a.dtype == b.dtype, lambda: f"{op}: {an} ({a.dtype}) and {bn} ({b.dtype}) must have the same dtype")


def floating(op: str, t, name: str) -> None:
    torch._check(
        t.dtype in FLOATING, lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
    )


def shape(op: str, t, name: str, expected) -> None:
    """``t`` has exactly the shape ``expected`` (a tuple of ints / SymInts)."""
    expected = tuple(expected)
    torch._check(
        t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected)),
        lambda: f"{op}: {name} has shape {list(t.shape)}, expected {list(expected)}",
    )


def output_mask(mask, n: int = 2) -> None:
    """A ``bool[n]`` list of exactly ``n`` entries, refused with the C++ kernels' message."""
    torch._check(
        len(mask) == n, lambda: f"Tried to convert a List with {len(mask)} elements to a fixed-size array of size {n}"
    )


def mask_dtype(op: str, t, name: str) -> None:
    if t is not None:
        torch._check(
            not t.is_complex(), lambda: f"{op}: {name} must be a bool, integer or floating tensor, got {t.dtype}"
        )


def offsets(op: str, o, like, like_name: str = "features") -> None:
    """int64 [B+1] on the device of ``like``; the values need the data, which a fake has not."""
    same_device(o, f"{op}: offsets", like, like_name)
    torch._check(
        o.dim() == 1 and o.shape[0] >= 1, lambda: f"{op}: offsets must be 1-D [B+1] with B >= 0, got {list(o.shape)}"
    )
    torch._check(o.dtype == torch.int64, lambda: f"{op}: offsets must be int64, got {o.dtype}")
