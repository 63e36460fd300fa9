"""The operator library is built on PyTorch's stable ABI and depends on nothing else of torch's.

A library that uses only torch's stable C shims loads under every torch at least as new as the one it
targets, without a rebuild. What proves it is the dynamic symbol table: no undefined C++ symbol of
at::, c10:: or torch:: (those change with every torch release), and no link to a torch library other
than the ones that export the shims. The Python extension _C carries build information only and
needs no torch symbol at all.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import maskattn
from maskattn import _build_info

HERE = os.path.dirname(maskattn.__file__)
LIB = os.path.join(HERE, "libmaskattn_ops.so")
# The libraries that export torch's stable C shims (libtorch_cuda: the CUDA ones).
SHIM_LIBS = {"libtorch_cpu.so", "libtorch_cuda.so"}
TORCH_LIB_PREFIXES = ("libtorch", "libc10", "libshm", "libcaffe2")

needs_binutils = pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs nm and readelf (binutils)"
)


def _dynsyms(path, *flags):
    out = subprocess.run(["nm", "-D", "-C", *flags, path], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 2)[-1] for line in out.splitlines() if line.strip()]


def _unstable(names):
    return [n for n in names if n.startswith(("at::", "c10::", "torch::", "caffe2::")) or "pybind11" in n]


def _needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return {line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}


def _extension():
    found = glob.glob(os.path.join(HERE, "_C.*.so"))
    assert len(found) == 1, found
    return found[0]


@needs_binutils
def test_no_unstable_torch_symbol_is_needed():
    undefined = _dynsyms(LIB, "--undefined-only")
    assert any(n.startswith("aoti_torch_") for n in undefined), "the library calls no stable shim at all"
    assert _unstable(undefined) == [], f"unstable torch symbols needed: {_unstable(undefined)[:20]}"


@needs_binutils
def test_no_torch_symbol_is_exported():
    # Header-only c10::Half/BFloat16 code is compiled into the library; exported, it could interpose
    # on (or be interposed by) another library's copy from a different torch release.
    assert _unstable(_dynsyms(LIB, "--defined-only")) == []


@needs_binutils
def test_links_only_the_shim_libraries_of_torch():
    torch_libs = {n for n in _needed(LIB) if n.startswith(TORCH_LIB_PREFIXES)}
    assert torch_libs <= SHIM_LIBS, f"links {sorted(torch_libs - SHIM_LIBS)}"
    assert "libtorch_cpu.so" in torch_libs


@needs_binutils
def test_python_extension_needs_nothing_of_torch():
    ext = _extension()
    undefined = _dynsyms(ext, "--undefined-only")
    torch_syms = [
        n for n in undefined if n.startswith(("at::", "c10::", "torch::", "caffe2::", "aoti_torch", "torch_"))
    ]
    assert torch_syms == [], torch_syms[:20]
    assert not {n for n in _needed(ext) if n.startswith(TORCH_LIB_PREFIXES)}


def test_every_op_is_registered_by_the_one_library():
    assert LIB in torch.ops.loaded_libraries
    libs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "lib*.so")))
    assert libs == ["libmaskattn_ops.so"], libs
    for name in _build_info.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskattn::{name}", "CPU"), name
    # every maskattn op, the packed and backward ops included, belongs to one of the ops the build
    # recorded and has a CPU kernel (only that library registers any)
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskattn::")]
    assert len(names) >= 2 * len(_build_info.OPS)
    for name in names:
        base = name.split("::", 1)[1].lstrip("_").removesuffix("_backward").removesuffix("_packed")
        assert base in _build_info.OPS, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


def _import_under(version):
    code = f"import torch; torch.__version__ = {version!r}; import maskattn"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


def test_import_under_an_older_torch_than_the_target_fails_clearly():
    r = _import_under("2.10.1")
    assert r.returncode != 0
    assert f"maskattn needs torch >= {_build_info.TORCH_TARGET}" in r.stderr
    assert "but torch 2.10.1 is installed" in r.stderr
    assert f"pip install 'torch>={_build_info.TORCH_TARGET}'" in r.stderr


def test_every_op_loads_under_a_newer_torch_than_the_build():
    # What the wheel does under a later torch release than it was built with: it imports and runs,
    # no version check refuses it.
    code = (
        "import torch; torch.__version__ = '99.0.0'; import maskattn; "
        "m = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0]]]); print(maskattn.patch_mask(m, 2).tolist()); "
        "q = torch.randn(1, 2, 4); kv = torch.randn(1, 3, 4); s = torch.zeros(()); "
        "print(torch.ops.maskattn.scaled_cross_attention(q, kv, kv, s, 100.0, None, False)[0].shape)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[[True, False]]", "torch.Size([1, 2, 4])"]


def test_target_is_2_11():
    # The GPU machines run torch 2.11: a newer target would not load there.
    assert _build_info.TORCH_TARGET == "2.11"
    assert maskattn.build_info()["torch_target"] == "2.11"
