"""Loads the compiled extension, refusing a torch other than the one it was built against.

A C++ extension is tied to the exact torch it was compiled with; loading it under another one
fails with an unreadable undefined-symbol error at best and crashes at worst. The build records the
torch version in _build_info.py, so the mismatch is caught before the shared library is touched.
"""

import torch

_REBUILD = (
    "Rebuild maskattn against the installed torch: pip install --no-build-isolation --force-reinstall --no-deps ."
)

try:
    from . import _build_info
except ImportError as e:  # running from a source tree that was never built
    raise ImportError(
        "maskattn's compiled extension is missing (no _build_info): install the package with "
        "'pip install --no-build-isolation .' rather than importing it from the source tree."
    ) from e


def _same_release(a: str, b: str) -> bool:
    # 2.13.0+cpu and 2.13.0 are ABI-identical builds of one release only when the suffix matches too,
    # so compare the whole string.
    return a == b


if not _same_release(_build_info.TORCH_VERSION, torch.__version__):
    raise ImportError(
        f"maskattn was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
        f"is installed. {_REBUILD}"
    )

try:
    from . import _C  # noqa: E402  (registers torch.ops.maskattn.*)
except ImportError as e:
    raise ImportError(
        f"maskattn's compiled extension failed to load under torch {torch.__version__}: {e}. {_REBUILD}"
    ) from e


def build_info() -> dict:
    """What this copy of maskattn was compiled against."""
    return {
        "torch_version": _C.torch_version,
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version or None,
    }


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a CUDA device is present."""
    return bool(_C.with_cuda) and torch.cuda.is_available()
