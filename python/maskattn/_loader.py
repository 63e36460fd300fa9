"""Loads the compiled operators.

Three compiled parts make up maskattn:

* ``libmaskattn_ops.so`` holds the ops built on PyTorch's stable ABI (``_build_info.STABLE_OPS``). It
  calls only torch's stable C shims, so one build loads under every torch at least as new as the
  release it targets (``_build_info.TORCH_TARGET``); an older torch is refused here with a clear
  message rather than an undefined-symbol error from the dynamic loader.
* ``libmaskattn_legacy.so`` (only while some ops are not ported, ``_build_info.LEGACY_OPS``) holds the
  ops still written against torch's C++ API, which is tied to the exact torch it was compiled with:
  under any other torch it is refused before it is touched, because loading it fails with an
  unreadable undefined-symbol error at best and crashes at worst.
* ``_C``, the Python extension, holds the build information only (it makes the wheel one per CPython
  version, not one per torch).

``MASKATTN_STABLE_OPS_ONLY=1`` skips the legacy library and defines the schemas of its ops without
kernels (calling one raises), so that the stable-ABI ops can be used and tested under a torch that the
legacy library was not built for. It goes away with the last unported op.
"""

import os
import re

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


def _release(version: str) -> tuple:
    """(major, minor) of a torch version string such as '2.14.1+cu130' or '2.15.0.dev20260101'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ImportError(f"maskattn cannot read the torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def _same_release(a: str, b: str) -> bool:
    # 2.13.0+cpu and 2.13.0 are ABI-identical builds of one release only when the suffix matches too,
    # so compare the whole string.
    return a == b


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
_LEGACY_LIBRARY = os.path.join(_HERE, "libmaskattn_legacy.so")


def _load(path: str, hint: str) -> None:
    try:
        torch.ops.load_library(path)  # its static registration blocks define torch.ops.maskattn.*
    except OSError as e:
        raise ImportError(
            f"maskattn's operator library {path} failed to load under torch {torch.__version__}: "
            f"{e.__cause__ or e}. {hint}"
        ) from e


_load(_OPS_LIBRARY, "Reinstall maskattn.")

_STABLE_ONLY = os.environ.get("MASKATTN_STABLE_OPS_ONLY") == "1"
if _build_info.LEGACY_OPS:
    if _STABLE_ONLY:
        _legacy_lib = torch.library.Library("maskattn", "FRAGMENT")
        for _schema in _build_info.LEGACY_SCHEMAS:
            _legacy_lib.define(_schema)
    else:
        if not _same_release(_build_info.TORCH_VERSION, torch.__version__):
            raise ImportError(
                f"maskattn was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
                f"is installed. Its ops {', '.join(_build_info.LEGACY_OPS)} are not on PyTorch's stable ABI yet "
                f"and need that exact torch. {_REBUILD}"
            )
        _load(_LEGACY_LIBRARY, _REBUILD)


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
