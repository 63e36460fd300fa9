"""Timing, ratios, summary and report shared by every benchmark suite.

The suite API is described in the package docstring (``maskattn/bench/__init__.py``). In short: a
suite yields :class:`Case` objects, each with named :class:`Impl` callables and their roles;
:func:`measure` times a case's implementations interleaved and returns one :class:`Row` each with
its ratios filled in; :func:`summarize` turns all rows into one :class:`LayerSummary` per layer
replaced; the ``format_*`` functions print them.
"""

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

# ---------------------------------------------------------------- roles and thresholds

BASELINE = "baseline"  # the user's layer that maskattn replaces, eager: the denominator of "vs eager"
COMPILED = "compiled"  # that layer under torch.compile: the denominator of "vs compiled"
MASKATTN = "maskattn"  # the replacement; one per case, the row the summary is about
VARIANT = "variant"  # another maskattn configuration (thread count, call pattern): shown, not summarised
FLOOR = "floor"  # the least memory traffic the op must do, timed as a plain torch op
REFERENCE = "reference"  # anything else worth a row (another formulation of the baseline, a device copy)
ROLES = (BASELINE, COMPILED, MASKATTN, VARIANT, FLOOR, REFERENCE)

# A ratio is the median over rounds of (reference time / row time) within the same round: the
# implementations of a round run back to back, so a slow spell of a shared host that lasts longer
# than a round cancels out of each round's ratio (it does not cancel out of a ratio of medians).
# It is marked unreliable when those per-round ratios spread by more than about +-10 %: their
# interquartile range exceeds NOISY_RATIO_IQR of the ratio.
NOISY_RATIO_IQR = 0.20
# The verdict's thresholds on a geometric-mean speedup: below WIN and above LOSS is "no gain".
WIN = 1.10
LOSS = 0.90


@dataclass(frozen=True)
class Layer:
    """A user's layer that maskattn replaces, and what replaces it (one summary block each)."""

    name: str  # e.g. "CLAM/ABMIL AttentionAggregator pooling"
    replacement: str  # e.g. "maskattn.masked_attention_pool"


@dataclass
class Impl:
    """One implementation of a case: a zero-argument callable that does one call's work."""

    name: str  # what it is, e.g. "CLAM/ABMIL AttentionAggregator (eager)"
    fn: Optional[Callable[[], object]]  # None: not available here; ``note`` says why
    role: str = REFERENCE
    threads: Optional[int] = None  # torch.set_num_threads around its samples (not inside them)
    note: str = ""


@dataclass
class Case:
    """One shape/configuration of one layer: its implementations are timed against each other."""

    layer: Layer
    case: str  # the shape / configuration, e.g. "B=8 N=2400 D=512 float32"
    mode: str  # "fwd" or "fwd+bwd": the two columns of the summary
    impls: List[Impl]
    detail: str = ""  # more about the mode, e.g. "frozen features"
    bytes_moved: Optional[int] = None  # bytes the op must move at least: GB/s = bytes_moved / time

    def __post_init__(self):
        if self.mode not in ("fwd", "fwd+bwd"):
            raise ValueError(f"Case.mode must be 'fwd' or 'fwd+bwd', got {self.mode!r}")
        for im in self.impls:
            if im.role not in ROLES:
                raise ValueError(f"Impl {im.name!r}: role {im.role!r} is not one of {ROLES}")
        names = [im.name for im in self.impls]
        if len(set(names)) != len(names):
            raise ValueError(f"case {self.case!r} {self.mode}: implementation names repeat: {names}")
        for role in (BASELINE, COMPILED, MASKATTN, FLOOR):
            if sum(im.role == role for im in self.impls) > 1:
                raise ValueError(f"case {self.case!r} {self.mode}: more than one implementation has role {role!r}")

    @property
    def mode_label(self) -> str:
        return f"{self.mode}, {self.detail}" if self.detail else self.mode


@dataclass
class Row:
    """One implementation of one case: its timings (milliseconds per call) and ratios."""

    suite: str
    layer: str
    replacement: str
    case: str
    mode: str
    detail: str
    impl: str
    role: str
    median_ms: float = float("nan")
    q1_ms: float = float("nan")
    q3_ms: float = float("nan")
    min_ms: float = float("nan")
    max_ms: float = float("nan")
    n: int = 0  # samples (rounds); each sample is the mean of ``calls`` back-to-back calls
    calls: int = 1
    samples_ms: List[float] = field(default_factory=list)
    warmup_s: float = 0.0  # the warm-up calls, torch.compile's compilation included
    settled: bool = False  # the case stopped because every median settled, not at the time bound
    gbps: Optional[float] = None
    vs_eager: Optional[float] = None
    vs_eager_band: Optional[List[float]] = None  # quartiles of the per-round ratios
    vs_eager_unreliable: bool = False
    vs_compiled: Optional[float] = None
    vs_compiled_band: Optional[List[float]] = None
    vs_compiled_unreliable: bool = False
    vs_floor: Optional[float] = None
    vs_floor_unreliable: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.n > 0 and math.isfinite(self.median_ms)

    @property
    def rel_iqr(self) -> float:
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.ok and self.median_ms > 0 else float("nan")

    @property
    def mode_label(self) -> str:
        return f"{self.mode}, {self.detail}" if self.detail else self.mode


@dataclass
class Settings:
    """How long to time. Every case runs rounds until each implementation has ``min_rounds`` samples
    and ``min_time`` seconds of timed calls and its median has settled (its 95 % confidence interval
    within +-``tol``), or until the case has run ``max_time`` seconds (then at least 3 rounds)."""

    device: torch.device = torch.device("cpu")
    min_time: float = 0.2
    max_time: float = 2.0
    min_rounds: int = 7
    tol: float = 0.03
    sample_time: float = 0.002  # calls are batched so that one sample takes about this long
    warmup: int = 2
    max_rounds: int = 100_000
    clock: Callable[[], float] = time.perf_counter
    progress: Optional[TextIO] = None  # where progress lines go (None: nowhere)
    t0: float = field(default_factory=time.perf_counter)  # the run's start, for elapsed times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maybe_compile(fn, enabled: bool = True):
    """torch.compile'd fn (compiled at its first call, i.e. during warm-up), or None when disabled."""
    if not enabled:
        return None
    # Every shape and every requires_grad pattern is its own specialised graph (dynamic=False, so the
    # compiled baseline is at its best); the suites compile more of those than dynamo's default limit.
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))
    try:
        return torch.compile(fn, fullgraph=True, dynamic=False)
    except Exception:  # pragma: no cover - depends on the toolchain present
        return None


# ---------------------------------------------------------------- timing


def _progress(s: Settings, msg: str) -> None:
    if s.progress is not None:
        print(f"[{time.perf_counter() - s.t0:7.1f} s] {msg}", file=s.progress, flush=True)


def _with_threads(n: Optional[int], fn: Callable[[], float]) -> float:
    if n is None:
        return fn()
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _sample(fn: Callable[[], object], calls: int, s: Settings) -> float:
    """Seconds per call of ``calls`` back-to-back calls."""
    if s.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = s.clock()
    for _ in range(calls):
        fn()
    return (s.clock() - t0) / calls


def median_ci(xs: Sequence[float], z: float = 1.96) -> tuple:
    """Distribution-free confidence interval of the median (order statistics; 95 % for z = 1.96)."""
    xs = sorted(xs)
    n = len(xs)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    return xs[lo], xs[hi]


def _settled(xs: Sequence[float], tol: float) -> bool:
    med = statistics.median(xs)
    lo, hi = median_ci(xs)
    return med > 0 and (med - lo) <= tol * med and (hi - med) <= tol * med


def _quartiles(xs: Sequence[float]) -> tuple:
    if len(xs) == 1:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _failure(e: Exception) -> str:
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"failed: {type(e).__name__}" + (f": {msg}" if msg else "")


def measure(case: Case, s: Settings, suite: str) -> List[Row]:
    """Time every implementation of ``case`` interleaved and return one row each, ratios filled in.

    Each implementation is warmed up (torch.compile compiles here), then the implementations run
    in rounds (a, b, c, then b, c, a, ...: each round starts one further along, so none always runs
    right after the same neighbour) until the medians settle or the time bound is hit. A slow spell
    of a shared host then lands on every implementation alike.
    """
    rows: Dict[str, Row] = {}
    live: List[Impl] = []
    calls: Dict[str, int] = {}
    head = f"{suite} | {case.case} | {case.mode_label}"
    for im in case.impls:
        row = Row(
            suite,
            case.layer.name,
            case.layer.replacement,
            case.case,
            case.mode,
            case.detail,
            im.name,
            im.role,
            note=im.note,
        )
        rows[im.name] = row
        if im.fn is None:
            _progress(s, f"{head} | {im.name}: not run ({im.note or 'unavailable'})")
            continue
        _progress(s, f"{head} | {im.name}: warm-up" + (" and compile" if im.role == COMPILED else ""))
        t0 = time.perf_counter()
        try:
            # The fastest warm-up call sets how many calls make one sample: a slow first call
            # (compilation, first touch of memory) must not make the samples single calls.
            one = min(_with_threads(im.threads, lambda im=im: _sample(im.fn, 1, s)) for _ in range(max(1, s.warmup)))
        except Exception as e:  # a compile failure or a missing kernel is reported, not fatal
            row.note = _failure(e)
            _progress(s, f"{head} | {im.name}: {row.note}")
            continue
        row.warmup_s = time.perf_counter() - t0
        calls[im.name] = max(1, min(1000, math.ceil(s.sample_time / one))) if one > 0 else 1000
        live.append(im)

    samples: Dict[str, List[float]] = {im.name: [] for im in live}
    settled = False
    rounds = 0
    if live:
        _progress(s, f"{head} | timing {len(live)} implementations interleaved")
        gc.collect()
        gc_was = gc.isenabled()
        gc.disable()  # a collection inside a sample would land on whichever implementation ran then
        t_start = s.clock()
        try:
            while live and rounds < s.max_rounds:
                k = rounds % len(live)
                for im in live[k:] + live[:k]:
                    try:
                        t = _with_threads(im.threads, lambda im=im: _sample(im.fn, calls[im.name], s))
                    except Exception as e:  # e.g. out of memory after a few rounds: drop it, keep the rest
                        rows[im.name].note = _failure(e)
                        _progress(s, f"{head} | {im.name}: {rows[im.name].note}")
                        live.remove(im)
                        del samples[im.name]
                        continue
                    samples[im.name].append(t)
                rounds += 1
                elapsed = s.clock() - t_start
                enough = rounds >= s.min_rounds and all(
                    sum(samples[im.name]) * calls[im.name] >= s.min_time for im in live
                )
                if enough and all(_settled(samples[im.name], s.tol) for im in live):
                    settled = True
                    break
                if elapsed >= s.max_time and rounds >= 3:
                    break
        finally:
            if gc_was:
                gc.enable()
        _progress(
            s,
            f"{head} | {rounds} rounds in {s.clock() - t_start:.2f} s, "
            + ("settled" if settled else "time bound hit before the medians settled"),
        )

    for im in live:
        xs = samples[im.name]
        r = rows[im.name]
        q1, q3 = _quartiles(xs)
        r.median_ms, r.q1_ms, r.q3_ms = statistics.median(xs) * 1e3, q1 * 1e3, q3 * 1e3
        r.min_ms, r.max_ms = min(xs) * 1e3, max(xs) * 1e3
        r.n, r.calls, r.samples_ms, r.settled = len(xs), calls[im.name], [x * 1e3 for x in xs], settled
        if case.bytes_moved:
            r.gbps = case.bytes_moved / (r.median_ms / 1e3) / 1e9
    out = list(rows.values())
    fill_ratios(out)
    return out


# ---------------------------------------------------------------- ratios and summary


def paired_ratio(ref: Row, row: Row) -> tuple:
    """(ratio, [q1, q3], unreliable): the median and quartiles of ref / row over the rounds in
    which both ran, > 1 when ``row`` is faster; unreliable as the legend says."""
    pairs = [a / b for a, b in zip(ref.samples_ms, row.samples_ms) if b > 0]
    if row is ref:
        return 1.0, [1.0, 1.0], False
    if not pairs:  # rows built without samples: the ratio of the medians, its band from the quartiles
        return ref.median_ms / row.median_ms, [ref.q1_ms / row.q3_ms, ref.q3_ms / row.q1_ms], True
    med = statistics.median(pairs)
    q1, q3 = _quartiles(pairs)
    return med, [q1, q3], (q3 - q1) > NOISY_RATIO_IQR * med


def fill_ratios(rows: List[Row]) -> None:
    """Set vs_eager / vs_compiled / vs_floor on the rows of one case (reference time / row time,
    so > 1 means the row is faster than the reference)."""

    def find(role):
        return next((r for r in rows if r.role == role and r.ok), None)

    base, comp, floor = find(BASELINE), find(COMPILED), find(FLOOR)
    for r in rows:
        if not r.ok:
            continue
        if base is not None:
            r.vs_eager, r.vs_eager_band, r.vs_eager_unreliable = paired_ratio(base, r)
        if comp is not None and r.role in (MASKATTN, VARIANT):
            r.vs_compiled, r.vs_compiled_band, r.vs_compiled_unreliable = paired_ratio(comp, r)
        if floor is not None and r.role != FLOOR:
            r.vs_floor, _, r.vs_floor_unreliable = paired_ratio(floor, r)


def geomean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


@dataclass
class LayerSummary:
    """maskattn against one layer it replaces, over every case of that layer."""

    suite: str
    layer: str
    replacement: str
    fwd: Optional[float] = None  # geometric mean of vs eager over the fwd cases
    fwd_bwd: Optional[float] = None
    fwd_compiled: Optional[float] = None  # geometric mean of vs compiled
    fwd_bwd_compiled: Optional[float] = None
    n_fwd: int = 0
    n_fwd_bwd: int = 0
    worst: Optional[float] = None  # the lowest vs eager of any case
    worst_case: str = ""
    worst_unreliable: bool = False
    n_ratios: int = 0
    n_unreliable: int = 0
    verdict: str = ""
    missing: str = ""  # why there is no ratio, when there is none


def verdict(fwd: Optional[float], fwd_bwd: Optional[float]) -> str:
    """Should a user switch, from the geometric-mean speedups over eager (None: mode not measured)."""
    present = {k: v for k, v in (("fwd", fwd), ("fwd+bwd", fwd_bwd)) if v is not None}
    if not present:
        return "no verdict: no ratio was measured"
    wins = [k for k, v in present.items() if v >= WIN]
    losses = [k for k, v in present.items() if v <= LOSS]
    if len(wins) == len(present):
        return "SWITCH"
    if wins:
        other = next(k for k in present if k not in wins)
        slower = "slower" if other in losses else "no faster"
        if wins == ["fwd+bwd"]:
            return f"SWITCH for training (fwd+bwd); forward alone is {slower}"
        return f"SWITCH for inference (fwd only); fwd+bwd is {slower}"
    if losses:
        return "KEEP the layer: maskattn is slower at these sizes"
    return "NO SPEED GAIN at these sizes"


def summarize(rows: List[Row]) -> List[LayerSummary]:
    """One summary per (suite, layer), in the order the layers first appear."""
    groups: Dict[tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault((r.suite, r.layer, r.replacement), []).append(r)
    out = []
    for (suite, layer, replacement), rs in groups.items():
        s = LayerSummary(suite, layer, replacement)
        head = [r for r in rs if r.role == MASKATTN and r.vs_eager is not None]
        by_mode = {m: [r for r in head if r.mode == m] for m in ("fwd", "fwd+bwd")}
        s.fwd = geomean([r.vs_eager for r in by_mode["fwd"]])
        s.fwd_bwd = geomean([r.vs_eager for r in by_mode["fwd+bwd"]])
        s.fwd_compiled = geomean([r.vs_compiled for r in by_mode["fwd"]])
        s.fwd_bwd_compiled = geomean([r.vs_compiled for r in by_mode["fwd+bwd"]])
        s.n_fwd, s.n_fwd_bwd = len(by_mode["fwd"]), len(by_mode["fwd+bwd"])
        s.n_ratios = len(head)
        s.n_unreliable = sum(r.vs_eager_unreliable for r in head)
        if head:
            w = min(head, key=lambda r: r.vs_eager)
            s.worst, s.worst_case, s.worst_unreliable = w.vs_eager, f"{w.mode_label}, {w.case}", w.vs_eager_unreliable
            s.verdict = verdict(s.fwd, s.fwd_bwd)
            if 2 * s.n_unreliable > s.n_ratios:
                s.verdict += " (uncertain: most ratios are unreliable)"
        else:
            why = sorted({r.note for r in rs if r.role in (BASELINE, MASKATTN) and not r.ok and r.note})
            s.missing = "; ".join(why) or "the baseline or maskattn was not timed"
            s.verdict = f"no verdict: {s.missing}"
        out.append(s)
    return out


# ---------------------------------------------------------------- formatting


def _pct(v: float) -> str:
    return ">999%" if v > 9.99 else f"{v * 100:.1f}%"


def _x(v: Optional[float], unrel: bool = False) -> str:
    if v is None:
        return ""
    text = f"{v:.2g}x" if v < 0.1 else (f"{v:.0f}x" if v >= 100 else f"{v:.2f}x")
    return text + ("?" if unrel else "")


LEGEND = [
    "Legend:",
    "  baseline    the user's layer maskattn replaces, written in plain PyTorch, named after its model/paper;",
    "              (eager) = run as written; (compiled) = the same under torch.compile(fullgraph=True, dynamic=False)",
    "  maskattn.*  the replacement; floor = the least memory traffic the op must do, timed as a plain torch op",
    "  ms          median time per call over n repeats; the implementations of a case run interleaved (a,b,c,b,c,a,...)",
    "  IQR%        spread: interquartile range of the repeats / median",
    "  vs eager    baseline (eager) time / this time, the median over rounds of the ratio within each round:",
    "              >1x = faster than the layer it replaces, <1x = slower; vs compiled likewise against the compiled",
    "              baseline; vs floor = floor time / this time (1x = as fast as just moving the bytes)",
    f"  ?           unreliable ratio: the per-round ratios spread by more than +-{NOISY_RATIO_IQR / 2:.0%} (IQR > "
    f"{NOISY_RATIO_IQR:.0%} of the ratio); rerun on a quieter machine",
    "  GB/s        bytes the op must move / median time",
]


def format_legend() -> str:
    return "\n".join(LEGEND)


def format_table(rows: List[Row]) -> str:
    """The rows of one suite, one block per (case, mode)."""
    hdr = (
        f"  {'implementation':<52} {'ms':>10} {'IQR%':>6} {'n':>4} {'GB/s':>7} "
        f"{'vs eager':>9} {'vs compiled':>11} {'vs floor':>9}"
    )
    out = [hdr, "  " + "-" * (len(hdr) - 2)]
    groups: Dict[tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault((r.layer, r.case, r.mode_label), []).append(r)
    layer = None
    for (lay, case, mode), rs in groups.items():
        if lay != layer:
            out.append(f"{lay} -> {rs[0].replacement}")
            layer = lay
        out.append(f" {case} | {mode}")
        for r in rs:
            if not r.ok:
                out.append(f"  {r.impl:<52} {'-':>10}  {r.note}")
                continue
            gb = f"{r.gbps:7.1f}" if r.gbps else ""
            out.append(
                f"  {r.impl:<52} {r.median_ms:10.3f} {_pct(r.rel_iqr):>6} {r.n:4d} {gb:>7} "
                f"{_x(r.vs_eager, r.vs_eager_unreliable):>9} {_x(r.vs_compiled, r.vs_compiled_unreliable):>11} "
                f"{_x(r.vs_floor, r.vs_floor_unreliable):>9}" + (f"  {r.note}" if r.note else "")
            )
    return "\n".join(out)


def format_summary(summaries: List[LayerSummary]) -> str:
    """Two lines per layer replaced: the verdict, then the numbers behind it."""
    out = [
        "Summary: maskattn against each layer it replaces (geometric mean over the cases of each mode; "
        ">1x = maskattn faster; ? = unreliable)"
    ]
    for s in summaries:
        out.append(f"* {s.layer} -> {s.replacement}: {s.verdict}")
        if s.worst is None:
            continue
        parts = []
        for name, v, vc, n in (
            ("fwd", s.fwd, s.fwd_compiled, s.n_fwd),
            ("fwd+bwd", s.fwd_bwd, s.fwd_bwd_compiled, s.n_fwd_bwd),
        ):
            if v is not None:
                parts.append(
                    f"{name} {_x(v)} vs eager" + (f" ({_x(vc)} vs compiled)" if vc is not None else "") + f" [{n}]"
                )
        out.append(
            "    "
            + "; ".join(parts)
            + f"; worst {_x(s.worst, s.worst_unreliable)} at {s.worst_case}"
            + f"; {s.n_unreliable} of {s.n_ratios} ratios ?"
        )
    return "\n".join(out)


def markdown_table(rows: List[Row]) -> str:
    """Every row as a Markdown table (for benchmarks/RESULTS.md)."""
    out = [
        "| suite | case | mode | implementation | ms (median) | IQR % | n | GB/s | vs eager | vs compiled | vs floor |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        impl = f"**{r.impl}**" if r.role == MASKATTN else r.impl
        if not r.ok:
            out.append(f"| {r.suite} | {r.case} | {r.mode_label} | {impl} | {r.note or 'not run'} | | | | | | |")
            continue
        gb = f"{r.gbps:.1f}" if r.gbps else ""
        out.append(
            f"| {r.suite} | {r.case} | {r.mode_label} | {impl} | {r.median_ms:.3f} | {r.rel_iqr * 100:.1f} | {r.n} "
            f"| {gb} | {_x(r.vs_eager, r.vs_eager_unreliable)} | {_x(r.vs_compiled, r.vs_compiled_unreliable)} "
            f"| {_x(r.vs_floor, r.vs_floor_unreliable)} |"
        )
    return "\n".join(out)


def markdown_summary(summaries: List[LayerSummary]) -> str:
    out = [
        "| layer replaced | maskattn | fwd vs eager | fwd+bwd vs eager | fwd vs compiled | fwd+bwd vs compiled "
        "| worst case | unreliable | verdict |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for s in summaries:
        worst = f"{_x(s.worst, s.worst_unreliable)} at {s.worst_case}" if s.worst is not None else ""
        out.append(
            f"| {s.layer} | {s.replacement} | {_x(s.fwd)} | {_x(s.fwd_bwd)} | {_x(s.fwd_compiled)} "
            f"| {_x(s.fwd_bwd_compiled)} | {worst} | {s.n_unreliable} of {s.n_ratios} | {s.verdict} |"
        )
    return "\n".join(out)


def rows_to_json(rows: List[Row]) -> List[dict]:
    out = []
    for r in rows:
        d = asdict(r)
        d["rel_iqr"] = r.rel_iqr if r.ok else None
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None  # JSON has no NaN
        out.append(d)
    return out
