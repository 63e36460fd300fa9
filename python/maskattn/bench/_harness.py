"""Timing and reporting shared by every benchmark suite.

Each suite module exposes ``run(args) -> list[Row]``; ``python -m maskattn.bench`` runs them all
and prints one table. Every row names exactly what was timed.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Row:
    suite: str  # the op, e.g. "masked_attention_pool"
    case: str  # shape / configuration, e.g. "B=8 N=2400 D=512"
    mode: str  # e.g. "fwd", "fwd+bwd (frozen features)"
    impl: str  # "seed eager", "seed compiled", "maskattn", "floor: read features once"
    ms: float  # median wall time per call, milliseconds
    gbps: Optional[float] = None  # bytes the op must move / time, where meaningful
    notes: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timeit(
    fn: Callable[[], object], device: torch.device, min_time: float = 0.3, warmup: int = 3, max_iters: int = 1000
) -> float:
    """Median seconds per call of fn over repeated runs of at least ``min_time`` in total."""
    return timeit_interleaved({"fn": fn}, device, min_time, warmup, max_iters)["fn"]


def timeit_interleaved(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    min_time: float = 0.3,
    warmup: int = 3,
    max_iters: int = 1000,
) -> Dict[str, float]:
    """Median seconds per call of each fn, the calls taken in turn (a, b, c, a, b, c, ...) until
    every fn has run for ``min_time`` in total: on a shared, noisy host a slow spell then hits
    every implementation alike instead of whichever happened to be timed during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    total = dict.fromkeys(fns, 0.0)
    while any(total[n] < min_time or len(times[n]) < 5 for n in fns) and min(map(len, times.values())) < max_iters:
        for name, fn in fns.items():
            t = _time_once(fn, device)
            times[name].append(t)
            total[name] += t
    return {name: statistics.median(ts) for name, ts in times.items()}


def maybe_compile(fn, enabled: bool = True):
    """torch.compile'd fn, or None when compilation is unavailable here (reported, not hidden)."""
    if not enabled:
        return None
    # Every shape and every requires_grad pattern is its own specialised graph (dynamic=False, so the
    # compiled seed is at its best); the suites compile more of those than dynamo's default limit.
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))
    try:
        return torch.compile(fn, fullgraph=True, dynamic=False)
    except Exception:  # pragma: no cover - depends on the toolchain present
        return None


def print_table(rows: List[Row], file=None) -> None:
    """Rows grouped by (suite, case, mode), each with its speedup over the first 'seed eager' row."""
    groups = {}
    for r in rows:
        groups.setdefault((r.suite, r.case, r.mode), []).append(r)
    header = f"{'suite':<8} {'case':<28} {'mode':<30} {'impl':<30} {'ms':>9} {'GB/s':>7} {'vs seed':>8}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for (suite, case, mode), rs in groups.items():
        base = next((r.ms for r in rs if r.impl == "seed eager"), None)
        for r in rs:
            sp = f"{base / r.ms:7.2f}x" if base and r.ms > 0 else ""
            gb = f"{r.gbps:7.1f}" if r.gbps else ""
            print(
                f"{suite:<8} {case:<28} {mode:<30} {r.impl:<30} {r.ms:9.3f} {gb:>7} {sp:>8}"
                + (f"  {r.notes}" if r.notes else ""),
                file=file,
            )


def markdown_table(rows: List[Row]) -> str:
    """The same grouping as print_table, as a Markdown table (for benchmarks/RESULTS.md)."""
    out = ["| suite | case | mode | impl | ms | GB/s | vs seed eager |", "|---|---|---|---|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r.suite, r.case, r.mode), []).append(r)
    for (suite, case, mode), rs in groups.items():
        base = next((r.ms for r in rs if r.impl == "seed eager"), None)
        for r in rs:
            sp = f"{base / r.ms:.2f}x" if base and r.ms > 0 else ""
            gb = f"{r.gbps:.1f}" if r.gbps else ""
            impl = f"**{r.impl}**" if r.impl == "maskattn" else r.impl
            out.append(f"| {suite} | {case} | {mode} | {impl} | {r.ms:.3f} | {gb} | {sp} |")
    return "\n".join(out)
