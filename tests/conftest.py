"""Shared test configuration: the device list every device-parametrised test uses, and the ``cuda``
marker, applied automatically to every test that runs on CUDA (``pytest -m cuda`` runs just those,
``-m "not cuda"`` leaves them out).

CUDA is in DEVICES only when this copy of maskattn was built with its CUDA kernels *and* a device is
present: a CPU-only build under a CUDA torch must not collect CUDA cases that can only fail.
"""

import os
import sys

import pytest
import torch

# the pure-PyTorch references (tests/reference_<op>.py) live beside the tests
sys.path.insert(0, os.path.dirname(__file__))

import maskattn  # noqa: E402

HAS_CUDA = maskattn.cuda_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs the CUDA build of maskattn and a GPU")


def _runs_on_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for v in callspec.params.values():
            if (isinstance(v, str) and v.startswith("cuda")) or (isinstance(v, torch.device) and v.type == "cuda"):
                return True
    return any(m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)


# The op registry (one entry per torch.ops.maskattn op: sample inputs, differentiable arguments,
# argument roles, reference), shared by the generic tests in test_op_registry.py and test_fuzz_ops.py.
from _registry import OPS, OPS_BY_NAME, OpEntry, Sample, registered_op_names  # noqa: E402, F401
