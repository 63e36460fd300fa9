"""Shared pieces of the hypothesis property tests (tests/test_properties_*.py).

Profiles: "ci" (default: fixed seed, bounded examples, so the default run stays fast) and "long"
(HYPOTHESIS_PROFILE=long: 2000 examples a test, random seed). A test may ask for fewer examples
than the profile in CI with ``@examples(n)``; under "long" every test runs the profile's count.
"""

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# forward tolerance against a float64 reference, by the kernel's input dtype
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
from conftest import DEVICES  # noqa: E402

LAYOUTS = ["contiguous", "transposed", "sliced", "offset"]


def examples(n):
    """Run n examples in CI; the long profile's own count otherwise."""
    if PROFILE == "ci":
        return settings(max_examples=n)
    return settings()


def layout(t, kind, offset=3):
    """The same values as t, stored another way: transposed, sliced (stride 2 in the last dim), or at
    a storage offset. The result is a fresh tensor (no autograd history) with t's device and dtype."""
    t = t.detach()
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced" and t.dim() >= 1:
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1] + 1,), dtype=t.dtype, device=t.device)
        big[..., 1::2] = t
        return big[..., 1::2]
    if kind == "offset":
        flat = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
        flat[offset:] = t.flatten()
        return flat[offset:].view(t.shape)
    return t.clone()


def leaf(t, kind, offset=3):
    """layout(t) as a leaf that requires grad and keeps the layout's strides."""
    out = layout(t, kind, offset)
    return out.requires_grad_() if out.is_floating_point() else out


def random_mask(shape, kind, g, p=0.5):
    """A valid mask of the given kind: 'all' valid, 'empty' (none valid), or 'random'."""
    if kind == "all":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=g) < p


def as_mask_dtype(m, dtype):
    """The same mask in another dtype (masks of any dtype are accepted: nonzero = valid)."""
    if dtype == torch.bool:
        return m
    if dtype.is_floating_point:
        return m.to(dtype) * 0.5  # nonzero, not 1: "nonzero = valid", not "== 1"
    return m.to(dtype) * 3


def close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        atol=tol,
        rtol=tol,
        msg=lambda m: f"{what}: {m}",
    )


def grad_or_zero(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


st_dtype = st.sampled_from(DTYPES)
st_device = st.sampled_from(DEVICES)
st_mask_kind = st.sampled_from(["all", "empty", "random"])
st_mask_dtype = st.sampled_from([torch.bool, torch.uint8, torch.int64, torch.float32])
st_layout = st.sampled_from(LAYOUTS)
st_seed = st.integers(0, 2**16)
