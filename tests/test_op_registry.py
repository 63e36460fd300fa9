"""Generic tests of every op in the registry (tests/_registry.py, re-exported by conftest): a new
op gets them by adding an entry - sample inputs, differentiable arguments, argument roles and a
pure-PyTorch reference.

* every ``torch.ops.maskattn`` op has an entry (and every entry is a registered op);
* ``torch.library.opcheck`` on every sample, on every device;
* the fake (meta) kernel returns what the real kernel returns: shapes, dtypes and strides;
* a call mixing devices ('meta' with a real one, and CPU with CUDA where there is a GPU) raises an
  error naming the op and the argument, whichever argument is elsewhere;
* outputs agree with the reference (float64 reference) on every sample, device and listed dtype.

The malformed-argument fuzz of every op is tests/test_fuzz_ops.py.
"""

import pytest
import torch
from _registry import to_float64
from conftest import DEVICES, HAS_CUDA, OPS, registered_op_names


def _params(devices=DEVICES, dtypes=False):
    out = []
    for e in OPS:
        for d in devices:
            for dt in e.dtypes if dtypes else (torch.float32,):
                for i in range(len(e.samples(d, dt))):
                    tag = f"{e.name}-{d}-{i}" + (f"-{str(dt)[6:]}" if dtypes else "")
                    out.append(pytest.param(e, d, dt, i, id=tag))
    return out


def _sample(entry, device, dtype, i):
    return entry.samples(device, dtype)[i]


def test_every_op_has_a_registry_entry():
    names = registered_op_names()
    assert names, "no maskattn op is registered"
    missing = sorted(set(names) - {e.name for e in OPS})
    assert not missing, f"ops without a registry entry in tests/_registry.py: {missing}"
    unknown = sorted({e.name for e in OPS} - set(names))
    assert not unknown, f"registry entries for ops that do not exist: {unknown}"


def test_every_backward_op_and_differentiable_op_pair_up():
    # A differentiable op has its backward as its own op (DESIGN.md): both need entries.
    names = {e.name for e in OPS}
    for e in OPS:
        if e.differentiable:
            assert f"_{e.name}_backward" in names, f"{e.name} is differentiable but has no backward op entry"
    for e in OPS:
        if e.name.startswith("_") and e.name.endswith("_backward"):
            fwd = e.name[1 : -len("_backward")]
            assert fwd in names, f"{e.name} has no forward op entry"


def test_roles_name_real_arguments():
    for e in OPS:
        assert set(e.roles) <= set(e.arg_names), (e.name, sorted(set(e.roles) - set(e.arg_names)))
        tensor_args = [a.name for a in e.op._schema.arguments if "Tensor" in str(a.type)]
        assert set(tensor_args) == set(e.roles), f"{e.name}: every tensor argument needs a role"
        for s in e.samples("cpu", torch.float32):
            assert len(s.args) == len(e.arg_names), (e.name, s.desc)


def _with_grad(entry, sample):
    grad = entry.differentiable if sample.grad is None else sample.grad
    out = []
    for name, a in zip(entry.arg_names, sample.args):
        if isinstance(a, torch.Tensor) and name in grad:
            a = a.detach().requires_grad_(True)
        out.append(a)
    return tuple(out)


@pytest.mark.parametrize("entry,device,dtype,i", _params())
def test_opcheck(entry, device, dtype, i):
    s = _sample(entry, device, dtype, i)
    torch.library.opcheck(entry.op, _with_grad(entry, s))


def _meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _outputs(r):
    return r if isinstance(r, tuple) else (r,)


def _strides_agree(a, b):
    # strides of size-1 dims carry no meaning; a zero-size tensor has no layout to compare
    if a.numel() == 0:
        return True
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


@pytest.mark.parametrize("entry,device,dtype,i", _params())
def test_fake_matches_real(entry, device, dtype, i):
    s = _sample(entry, device, dtype, i)
    real = _outputs(entry.op(*s.args))
    fake = _outputs(entry.op(*[_meta(a) for a in s.args]))
    assert len(real) == len(fake)
    for k, (r, f) in enumerate(zip(real, fake)):
        what = f"{entry.name} output {k} ({s.desc})"
        assert f.device.type == "meta", what
        assert f.shape == r.shape, f"{what}: fake shape {tuple(f.shape)}, real {tuple(r.shape)}"
        assert f.dtype == r.dtype, f"{what}: fake dtype {f.dtype}, real {r.dtype}"
        assert _strides_agree(f, r), f"{what}: fake strides {f.stride()}, real {r.stride()}"


def _other_devices(device):
    others = ["meta"]
    if HAS_CUDA:
        others.append("cpu" if device.startswith("cuda") else "cuda")
    return others


@pytest.mark.parametrize("entry", OPS, ids=[e.name for e in OPS])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_devices_raise_naming_op_and_argument(entry, device):
    s = entry.samples(device, torch.float32)[0]
    tensor_args = [k for k, a in enumerate(s.args) if isinstance(a, torch.Tensor)]
    if len(tensor_args) < 2:
        pytest.skip(f"{entry.name} takes one tensor")
    for k in tensor_args:
        name = entry.arg_names[k]
        for other in _other_devices(device):
            args = list(s.args)
            args[k] = args[k].to(other)
            with pytest.raises(RuntimeError) as info:
                entry.op(*args)
            msg = str(info.value)
            assert entry.name in msg and name in msg and "same device" in msg, (name, other, msg)


def _close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.dtype == torch.bool or not expected.is_floating_point():
        assert torch.equal(actual.cpu(), expected), what
        return
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("entry,device,dtype,i", _params(dtypes=True))
def test_matches_reference(entry, device, dtype, i):
    s = _sample(entry, device, dtype, i)
    out = _outputs(entry.op(*s.args))
    ref = _outputs(entry.reference(*[to_float64(a) for a in s.args]))
    assert len(out) == len(ref), entry.name
    for k, (o, r) in enumerate(zip(out, ref)):
        _close(o, r, entry.tol[dtype], f"{entry.name} output {k} ({s.desc})")
