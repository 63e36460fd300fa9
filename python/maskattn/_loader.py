"""Loads the compiled operators.

Two compiled parts make up maskattn:

* ``libmaskattn_ops.so`` holds every op (``_build_info.OPS``), built on PyTorch's stable ABI. It calls
  only torch's stable C shims, so one build loads under every torch at least as new as the release it
  targets (``_build_info.TORCH_TARGET``), without a rebuild; an older torch is refused here with a
  clear message rather than an undefined-symbol error from the dynamic loader.
* ``_C``, the Python extension, holds the build information only (it makes the wheel one per CPython
  version, not one per torch).
"""

import os
import re

import torch

try:
    from . import _build_info
except ImportError as e:  # running from a source tree that was never built
    raise ImportError(
        "maskattn's compiled extension is missing (no _build_info): install the package with "
        "'pip install --no-build-isolation .' rather than importing it from the source tree."
    ) from e


def _release(version: str) -> tuple:
    """(major, minor) of a torch version string such as '2.14.1+cu130' or '2.15.0.dev20260101'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ImportError(f"maskattn cannot read the torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


if _release(torch.__version__) < _release(_build_info.TORCH_TARGET):
    raise ImportError(
        f"maskattn needs torch >= {_build_info.TORCH_TARGET} (its operators are built on PyTorch's stable ABI "
        f"for {_build_info.TORCH_TARGET} and newer), but torch {torch.__version__} is installed. "
        f"Upgrade torch: pip install 'torch>={_build_info.TORCH_TARGET}'."
    )

try:
    from . import _C  # build information; no operator, no torch symbol
except ImportError as e:
    raise ImportError(f"maskattn's compiled extension _C failed to load: {e}. Reinstall maskattn.") from e

_HERE = os.path.dirname(os.path.abspath(__file__))
_OPS_LIBRARY = os.path.join(_HERE, "libmaskattn_ops.so")


def _load(path: str, hint: str) -> None:
    try:
        torch.ops.load_library(path)  # its static registration blocks define torch.ops.maskattn.*
    except OSError as e:
        raise ImportError(
            f"maskattn's operator library {path} failed to load under torch {torch.__version__}: "
            f"{e.__cause__ or e}. {hint}"
        ) from e


_load(_OPS_LIBRARY, "Reinstall maskattn.")


def build_info() -> dict:
    """What this copy of maskattn was compiled against."""
    return {
        "torch_version": _C.torch_version,
        "torch_target": _C.torch_target,
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version or None,
    }


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a CUDA device is present."""
    return bool(_C.with_cuda) and torch.cuda.is_available()
