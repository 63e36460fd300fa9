"""The operator library is built on PyTorch's stable ABI and depends on nothing else of torch's.

A library that uses only torch's stable C shims loads under every torch at least as new as the one it
targets, without a rebuild. What proves it is the dynamic symbol table: no undefined C++ symbol of
at::, c10:: or torch:: (those change with every torch release), and no link to a torch library other
than the ones that export the shims.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import maskattn
from maskattn import _build_info

LIB = os.path.join(os.path.dirname(maskattn.__file__), "libmaskattn_ops.so")
# The libraries that export torch's stable C shims (libtorch_cuda: the CUDA ones).
SHIM_LIBS = {"libtorch_cpu.so", "libtorch_cuda.so"}

needs_binutils = pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs nm and readelf (binutils)"
)


def _dynsyms(*flags):
    out = subprocess.run(["nm", "-D", "-C", *flags, LIB], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 2)[-1] for line in out.splitlines() if line.strip()]


def _unstable(names):
    return [n for n in names if n.startswith(("at::", "c10::", "torch::", "caffe2::")) or "pybind11" in n]


@needs_binutils
def test_no_unstable_torch_symbol_is_needed():
    undefined = _dynsyms("--undefined-only")
    assert any(n.startswith("aoti_torch_") for n in undefined), "the library calls no stable shim at all"
    assert _unstable(undefined) == [], f"unstable torch symbols needed: {_unstable(undefined)[:20]}"


@needs_binutils
def test_no_torch_symbol_is_exported():
    # Header-only c10::Half/BFloat16 code is compiled into the library; exported, it could interpose
    # on (or be interposed by) another library's copy from a different torch release.
    assert _unstable(_dynsyms("--defined-only")) == []


@needs_binutils
def test_links_only_the_shim_libraries_of_torch():
    out = subprocess.run(["readelf", "-d", LIB], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}
    torch_libs = {n for n in needed if n.startswith(("libtorch", "libc10", "libpython", "libshm"))}
    assert torch_libs <= SHIM_LIBS, f"links {sorted(torch_libs - SHIM_LIBS)}"
    assert "libtorch_cpu.so" in torch_libs


def test_ported_ops_are_registered_by_the_stable_library():
    assert LIB in torch.ops.loaded_libraries
    for name in _build_info.STABLE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskattn::{name}", "CPU"), name


def _import_under(version):
    code = f"import torch; torch.__version__ = {version!r}; import maskattn"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


def test_import_under_an_older_torch_than_the_target_fails_clearly():
    r = _import_under("2.10.1")
    assert r.returncode != 0
    assert f"maskattn needs torch >= {_build_info.TORCH_TARGET}" in r.stderr
    assert "but torch 2.10.1 is installed" in r.stderr


def test_target_is_2_11():
    # The GPU machines run torch 2.11: a newer target would not load there.
    assert _build_info.TORCH_TARGET == "2.11"
    assert maskattn.build_info()["torch_target"] == "2.11"
