"""Malformed-argument fuzzing of every registered op (tests/test_fuzz_ops.py runs it).

Cases are derived from the registry (tests/_registry.py): every valid sample of every op, then each
sample with one argument broken - its rank, one size (+1, -1, 0, or 2^40 + 1 through a zero-stride
view where +1 is already refused), its dtype (integer, bool, complex, another floating type), its
device ('meta'), its layout (transposed, strided, offset, zero-stride), an optional tensor dropped,
scalars out of range (negative / huge ints, NaN / inf / huge floats), output_mask lists of the wrong
length or all False, and for packed offsets bad values (negative, out of range, non-monotone, first
not 0, last not T, 2^62); then random pairs of those; then every case again with all its tensors on
'meta' (the fake kernels). Everything is built from fixed seeds, so a child process rebuilds exactly
the same list and runs a slice of it by index.

Outcomes, per case:
  * the process dies from a signal (segfault, abort, a sanitizer's report) or hangs: a failure;
  * a clean exception of type RuntimeError (torch's TORCH_CHECK and torch._check errors, including
    NotImplementedError and torch.OutOfMemoryError, which derive from it), ValueError, TypeError or
    IndexError (c10's IndexError / TypeError / ValueError, and what the dispatcher raises for a bad
    argument type or list length) is accepted; any other exception type is a failure;
  * on a real device (not all-'meta') the message must name the op (the dispatcher's own argument
    parsing messages, which name it as maskattn::<op>, do too), so that "Dimension out of range"
    from an unchecked .size() or "expected scalar type" from an unchecked dtype fails;
  * what must be refused is refused: a dtype the argument's role does not allow, a tensor on
    another device, and (on the CPU, where the check needs no sync) bad offsets;
  * the valid samples run, and a layout-only change gives the result of the same values stored
    contiguously (the ops accept any strides).
"""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional

import torch
from _registry import FLOAT, IMAGE, MASK, OFFSETS, OPS, OPS_BY_NAME, SCALAR  # noqa: F401 (OPS_BY_NAME re-exported)

ACCEPTED = (RuntimeError, ValueError, TypeError, IndexError)
HUGE = 2**40 + 1  # odd, so that it is no multiple of a patch size either
# torch's own messages that cannot name the op: a bool[N] list of the wrong length.
UNNAMED_OK = ("Tried to convert a List with",)


@dataclasses.dataclass
class Case:
    op: str
    desc: str
    build: Callable[[], tuple]
    must_raise: bool = False
    must_run: bool = False  # a valid sample
    layout_only: bool = False  # same values, other strides: must match the contiguous call
    meta: bool = False  # every tensor on 'meta': the fake kernel
    after: Optional[int] = None  # run only if case `after` raised (huge sizes: only where +1 is refused)


# ------------------------------------------------------------------ mutations of one argument


def _pad1(t, d):
    if t.shape[d] == 0:
        shape = list(t.shape)
        shape[d] = 1
        return torch.ones(shape, dtype=t.dtype, device=t.device)
    return torch.cat([t, t.narrow(d, 0, 1)], d)


def _huge(t, d):
    shape = list(t.shape)
    shape[d] = HUGE
    base = t.narrow(d, 0, 1) if t.shape[d] > 0 else torch.ones(shape[:d] + [1] + shape[d + 1 :], dtype=t.dtype)
    return base.to(t.device).expand(shape)


def _sliced(t):
    if t.dim() == 0:
        return t.clone()
    big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1] + 1,), dtype=t.dtype, device=t.device)
    big[..., 1::2] = t
    return big[..., 1::2]


def _offset(t, k=3):
    flat = torch.zeros(t.numel() + k, dtype=t.dtype, device=t.device)
    flat[k:] = t.reshape(-1)
    return flat[k:].view(t.shape)


def _tensor_mutations(t, role, n_float):
    """(desc, fn, must_raise, layout_only, size_plus1_dim) for one tensor argument."""
    out = []
    # rank
    out.append(("unsqueeze(0)", lambda t: t.unsqueeze(0), role == SCALAR, False))
    out.append(("unsqueeze(-1)", lambda t: t.unsqueeze(-1), role == SCALAR, False))
    if t.dim() >= 2:
        out.append(("flattened", lambda t: t.reshape(-1), False, False))
    if t.dim() >= 1:
        out.append(("0-dim", lambda t: t.reshape(-1)[:1].reshape(()) if t.numel() else t.new_zeros(()), False, False))
        out.append(
            ("last dim dropped", lambda t: t.new_zeros(t.shape[:-1]) if t.shape[-1] == 0 else t[..., 0], False, False)
        )
    # sizes
    for d in range(t.dim()):
        out.append((f"size({d}) + 1", lambda t, d=d: _pad1(t, d), False, False, d))
        if t.shape[d] >= 1:
            out.append((f"size({d}) - 1", lambda t, d=d: t.narrow(d, 0, t.shape[d] - 1), False, False))
        if t.shape[d] >= 2:
            out.append((f"size({d}) = 0", lambda t, d=d: t.narrow(d, 0, 0), False, False))
    # dtypes
    for dt in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float64, torch.float16):
        if dt == t.dtype:
            continue
        if role == FLOAT:
            bad = not dt.is_floating_point or n_float > 1
        elif role == SCALAR:
            bad = not dt.is_floating_point
        elif role == MASK:
            bad = dt.is_complex
        elif role == OFFSETS:
            bad = True
        elif role == IMAGE:
            bad = dt != torch.uint8 and not dt.is_floating_point
        else:
            raise ValueError(f"unknown role {role!r}")
        out.append((f"dtype {str(dt)[6:]}", lambda t, dt=dt: t.to(dt), bad, False))
    # layouts: the same values stored otherwise
    if t.dim() >= 2:
        out.append(("stored transposed", lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), False, True))
    if t.dim() >= 1:
        out.append(("stride 2", _sliced, False, True))
    out.append(("storage offset 3", _offset, False, True))
    for d in range(t.dim()):
        if t.shape[d] >= 2:
            out.append((f"zero stride in dim {d}", lambda t, d=d: t.narrow(d, 0, 1).expand(t.shape), False, True))
    return out


def _offsets_mutations(o):
    """Bad values for int64 offsets [B+1] of T rows."""
    v = o.tolist()
    T = v[-1]
    cands = [
        ("offsets[0] = -1", [-1] + v[1:]),
        ("offsets[0] = 1", [1] + v[1:] if len(v) > 1 else [1]),
        ("offsets[-1] = T - 1", v[:-1] + [T - 1]),
        ("offsets[-1] = T + 1", v[:-1] + [T + 1]),
        ("offsets[-1] = 2^62", v[:-1] + [2**62]),
        ("an offset = 2^62", v[:1] + [2**62] + v[1:]),
        ("an offset = -2^63", v[:1] + [-(2**63)] + v[1:]),
        ("an offset = -5", v[:1] + [-5] + v[1:]),
        ("non-monotone", v[:1] + [T, 0] + v[1:] if T > 0 else [0, 1, 0]),
        ("one offset, T", [T]),
    ]
    if len(v) >= 3:
        cands.append(("decreasing", v[:1] + v[1:-1][::-1] + v[-1:]))
    return [(d, x) for d, x in cands if x != v]


def _scalar_values(kind, value):
    if kind == "int":
        vals = [-1, 0, 1, 3, 2**31, 2**62, -(2**63)]
    elif kind == "float":
        vals = [math.nan, math.inf, -math.inf, -1.0, 0.0, 2.0, 1e300, -1e-300]
    else:
        vals = []
    return [x for x in vals if not (x == value and type(x) is type(value))]


def _replace(args, k, fn):
    def build():
        a = list(args)
        a[k] = fn(a[k])
        return tuple(a)

    return build


def _compose(b1, k2, fn2):
    def build():
        a = list(b1())
        a[k2] = fn2(a[k2])
        return tuple(a)

    return build


def _to_meta(build):
    def b():
        return tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in build())

    return b


def op_cases(device: str) -> List[Case]:
    cases: List[Case] = []
    rng = random.Random(1234)
    for e in OPS:
        schema = e.op._schema.arguments
        kinds = [str(a.type) for a in schema]
        for si, s in enumerate(e.samples(device, torch.float32)):
            args = s.args
            tensors = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
            n_float = sum(1 for k in tensors if e.roles[e.arg_names[k]] == FLOAT)
            tag = f"{e.name} [sample {si}: {s.desc}]"
            cases.append(Case(e.name, f"{tag} as is", lambda args=args: tuple(args), must_run=True))
            single = []  # (desc, k, fn) for the random pairs
            for k, a in enumerate(args):
                name, kind = e.arg_names[k], kinds[k]
                if isinstance(a, torch.Tensor):
                    role = e.roles[name]
                    for m in _tensor_mutations(a, role, n_float):
                        desc, fn, bad, layout = m[:4]
                        cases.append(Case(e.name, f"{tag} {name}: {desc}", _replace(args, k, fn), bad, False, layout))
                        single.append((f"{name}: {desc}", k, fn))
                        if len(m) == 5:  # size + 1: then 2^40 + 1 where that is refused
                            d = m[4]
                            cases.append(
                                Case(
                                    e.name,
                                    f"{tag} {name}: size({d}) = 2^40 + 1 (zero stride)",
                                    _replace(args, k, lambda t, d=d: _huge(t, d)),
                                    True,
                                    after=len(cases) - 1,
                                )
                            )
                    if len(tensors) > 1:
                        fn = lambda t: t.to("meta")  # noqa: E731
                        cases.append(Case(e.name, f"{tag} {name}: on meta", _replace(args, k, fn), True))
                        single.append((f"{name}: on meta", k, fn))
                    if kind.startswith("Optional["):
                        fn = lambda t: None  # noqa: E731
                        cases.append(Case(e.name, f"{tag} {name}: None", _replace(args, k, fn)))
                        single.append((f"{name}: None", k, fn))
                    if role == OFFSETS:
                        for desc, vals in _offsets_mutations(a):
                            fn = lambda t, vals=vals: torch.tensor(vals, dtype=torch.int64, device=t.device)
                            cases.append(Case(e.name, f"{tag} {name}: {desc}", _replace(args, k, fn), device == "cpu"))
                            single.append((f"{name}: {desc}", k, fn))
                elif a is None and kind.startswith("Optional["):
                    for desc, fn in (
                        ("a [1] tensor", lambda _: torch.zeros(1, device=device)),
                        ("a 0-dim complex tensor", lambda _: torch.zeros((), dtype=torch.complex64, device=device)),
                    ):
                        cases.append(Case(e.name, f"{tag} {name}: {desc} for None", _replace(args, k, fn)))
                        single.append((f"{name}: {desc} for None", k, fn))
                elif kind == "List[bool]":
                    n = len(a)
                    for desc, v in (
                        ("length 0", []),
                        ("length 1", [True]),
                        (f"length {n + 1}", [True] * (n + 1)),
                        ("all False", [False] * n),
                        ("all True", [True] * n),
                    ):
                        fn = lambda _, v=v: list(v)  # noqa: E731
                        # bool[n] means n entries: every op and fake kernel refuses another length
                        bad = len(v) != n
                        cases.append(Case(e.name, f"{tag} {name} = {v} ({desc})", _replace(args, k, fn), bad))
                        single.append((f"{name} = {v}", k, fn))
                elif kind in ("int", "float"):
                    for v in _scalar_values(kind, a):
                        fn = lambda _, v=v: v  # noqa: E731
                        cases.append(Case(e.name, f"{tag} {name} = {v!r}", _replace(args, k, fn)))
                        single.append((f"{name} = {v!r}", k, fn))
                elif kind == "str":
                    # the only str argument names a choice (an activation): anything else is refused
                    for v in ("", a.upper(), a + " ", "sigmoid", "x" * 10000, a + "\x00"):
                        fn = lambda _, v=v: v  # noqa: E731
                        cases.append(Case(e.name, f"{tag} {name} = {v[:20]!r}", _replace(args, k, fn), True))
                        single.append((f"{name} = {v[:20]!r}", k, fn))
                elif kind == "bool":
                    fn = lambda x: not x  # noqa: E731
                    cases.append(Case(e.name, f"{tag} {name} = {not a}", _replace(args, k, fn)))
            for _ in range(8):  # two arguments broken at once
                (d1, k1, f1), (d2, k2, f2) = rng.sample(single, 2)
                while k2 == k1 and len({k for _, k, _ in single}) > 1:
                    d2, k2, f2 = rng.choice(single)
                if k2 == k1:
                    continue
                b = _compose(_replace(args, k1, f1), k2, f2)
                cases.append(Case(e.name, f"{tag} {d1} and {d2}", b))
    # every case again on 'meta': the fake kernels must not crash either
    n = len(cases)
    for i in range(n):
        c = cases[i]
        after = None if c.after is None else c.after + n
        cases.append(
            Case(c.op, c.desc + " (all on meta)", _to_meta(c.build), must_run=c.must_run, meta=True, after=after)
        )
    return cases


# ------------------------------------------------------------------ the child process


def _outputs(r):
    return r if isinstance(r, tuple) else (r,)


def _same(a, b):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            if not torch.allclose(x.double().cpu(), y.double().cpu(), rtol=1e-4, atol=1e-5, equal_nan=True):
                return False
        elif not torch.equal(x.cpu(), y.cpu()):
            return False
    return True


def _contiguous(args):
    return tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in args)


def _raises(c: Case) -> bool:
    op = getattr(torch.ops.maskattn, c.op).default
    try:
        op(*c.build())
    except ACCEPTED:
        return True
    return False


def run_case(cases: List[Case], i: int, device: str) -> str:
    """Runs case i; returns '' when it behaves, else what is wrong."""
    c = cases[i]
    if c.after is not None and not _raises(cases[c.after]):
        return ""
    op = getattr(torch.ops.maskattn, c.op).default
    try:
        args = c.build()
    except ACCEPTED:
        return ""  # torch refused to build the malformed tensor itself (e.g. a size that overflows)
    except BaseException as e:  # noqa: BLE001
        return f"unexpected exception type {type(e).__name__} building the arguments: {str(e)[:300]}"
    try:
        out = _outputs(op(*args))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except ACCEPTED as e:
        msg = str(e)
        if "CUDA error" in msg or "device-side assert" in msg:
            return f"CUDA error: {msg.splitlines()[0][:300]}"
        if c.must_run:
            return f"a valid sample raised {type(e).__name__}: {msg.splitlines()[0][:300]}"
        if not c.meta and c.op not in msg and not msg.startswith(UNNAMED_OK):
            return f"{type(e).__name__} does not name the op: {msg.splitlines()[0][:300]}"
        if c.layout_only:
            try:
                op(*_contiguous(args))
            except ACCEPTED:
                return ""
            return f"raised on this layout, but not on the same values stored contiguously: {msg[:200]}"
        return ""
    except BaseException as e:  # noqa: BLE001 - any other exception type is the finding
        return f"unexpected exception type {type(e).__name__}: {str(e)[:300]}"
    if c.must_raise:
        return "no error"
    if c.layout_only:
        try:
            ref = _outputs(op(*_contiguous(args)))
        except ACCEPTED as e:
            return f"ran on this layout, but the contiguous call raised: {str(e)[:200]}"
        if not _same(out, ref):
            return "result differs from the call on the same values stored contiguously"
    return ""


def child(generator: str, device: str, start: int, end: int, progress: str) -> None:
    """Runs cases [start, end) of generator(device); a line per case start and end in `progress`."""
    torch.set_num_threads(1)
    mod, fn = generator.split(":")
    cases = getattr(__import__(mod), fn)(device)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for i in range(start, min(end, len(cases))):
        os.write(fd, f"S {i}\n".encode())
        problem = run_case(cases, i, device)
        os.write(fd, ("D " + json.dumps([i, problem]) + "\n").encode())
        if problem.startswith("CUDA error"):
            os._exit(3)  # the context is unusable; the parent goes on in a fresh process
    os.close(fd)


# ------------------------------------------------------------------ the parent


def _spawn(generator, device, start, end, progress, tests_dir):
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import _fuzz; "
        f"_fuzz.child({generator!r}, {device!r}, {start}, {end}, {progress!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class _Progress:
    """Reads a child's progress file as it grows: the case last started, and the results."""

    def __init__(self, path):
        self.path, self.pos, self.buf = path, 0, ""
        self.started, self.done = None, {}

    def poll(self):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
            self.pos = f.tell()
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.startswith("S "):
                self.started = int(line[2:])
            elif line.startswith("D "):
                i, problem = json.loads(line[2:])
                self.done[i] = problem

    @property
    def pending(self):
        return self.started if self.started is not None and self.started not in self.done else None


def _run_range(generator, device, start, end, workdir, tests_dir, case_timeout, tag):
    """Runs [start, end) in a child. Returns (results {i: problem}, death): death is None when the
    child ran to the end (or stopped after a CUDA error, recorded as that case's problem), else
    (i, what) for the case it died or hung in, i = None when it died between cases."""
    path = os.path.join(workdir, f"progress-{tag}-{start}")
    if os.path.exists(path):
        os.remove(path)
    pr = _Progress(path)
    p = _spawn(generator, device, start, end, path, tests_dir)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(p.stderr.read()), daemon=True)
    reader.start()
    last, since = object(), time.monotonic()
    while p.poll() is None:
        time.sleep(0.05)
        pr.poll()
        key = (pr.pending, len(pr.done))
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since > (case_timeout if pr.pending is not None else case_timeout + 120):
            p.kill()
            p.wait()
            reader.join(5)
            i = pr.pending if pr.pending is not None else start
            return pr.done, (i, f"hung (no result after {case_timeout:.0f} s)")
    reader.join(5)
    pr.poll()
    rc = p.returncode
    if rc == 0 or rc == 3:
        return pr.done, None
    err = b"".join(x for x in stderr if x).decode(errors="replace").strip().splitlines()
    tail = " | ".join(err[-3:])[:400]
    what = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"child exited with status {rc}"
    return pr.done, (pr.pending, f"{what}: {tail}" if tail else what)


def fuzz(generator, device, n_cases, workdir, tests_dir, shards=2, case_timeout=20.0):
    """Runs all cases in `shards` child processes at a time. A child that dies or hangs is replaced
    by one that goes on after the culprit, which is first re-run alone to tell a case that crashes by
    itself from one that crashes only after the cases before it (heap damage done earlier).
    Returns {index: problem} for every case that misbehaved (index -1: a child died between cases)."""
    problems = {}
    lock = threading.Lock()

    def shard(lo, hi, tag):
        start = lo
        while start < hi:
            done, death = _run_range(generator, device, start, hi, workdir, tests_dir, case_timeout, tag)
            with lock:
                problems.update({i: p for i, p in done.items() if p})
            nxt = max(done) + 1 if done else start
            if death is None:
                if nxt >= hi or not done:
                    return
                start = nxt  # a CUDA error ended the child: go on in a new one
                continue
            i, what = death
            if i is None:
                with lock:
                    problems[-1] = f"a child died between cases ({what}), after case {nxt - 1}"
                start = nxt
                continue
            _, alone = _run_range(generator, device, i, i + 1, workdir, tests_dir, case_timeout, tag + "-alone")
            with lock:
                problems[i] = what + ("" if alone else " (only after the cases before it; alone it passes)")
            start = i + 1

    bounds = [n_cases * s // shards for s in range(shards + 1)]
    threads = [threading.Thread(target=shard, args=(bounds[s], bounds[s + 1], f"s{s}")) for s in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return problems
