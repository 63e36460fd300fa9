"""Argument checks shared by the fake (meta) kernels, worded as the C++ checks in csrc/common/checks.h.

The C++ checks only run in the CPU/CUDA kernels; a call that mixes a real device with 'meta', or a
torch.compile trace with FakeTensors on different devices, reaches the fake kernel instead, so the
fake kernels check devices too and give the same message.
"""

import torch


def same_device(a, an: str, b, bn: str) -> None:
    """``a`` and ``b`` (tensors, ``b`` may be None) on one device; ``an`` is prefixed with the op name."""
    if a is None or b is None:
        return
    torch._check(a.device == b.device, lambda: f"{an} ({a.device}) and {bn} ({b.device}) must be on the same device")
