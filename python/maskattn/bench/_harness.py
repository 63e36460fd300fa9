"""Timing and reporting shared by every benchmark suite.

Each suite module exposes ``run(args) -> list[Row]``; ``python -m maskattn.bench`` runs them all
and prints one table. Every row names exactly what was timed.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


@dataclass
class Row:
    suite: str           # e.g. "pool"
    case: str            # shape / configuration, e.g. "B=8 N=2400 D=512"
    mode: str            # e.g. "fwd", "fwd+bwd (frozen features)"
    impl: str            # "seed eager", "seed compiled", "maskattn", "floor: read features once"
    ms: float            # median wall time per call, milliseconds
    gbps: Optional[float] = None  # bytes the op must move / time, where meaningful
    notes: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, min_time: float = 0.3, warmup: int = 3,
           max_iters: int = 1000) -> float:
    """Median seconds per call of fn over repeated runs of at least ``min_time`` in total."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    total = 0.0
    while (total < min_time or len(times) < 5) and len(times) < max_iters:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        total += t
    return statistics.median(times)


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
            print(f"{suite:<8} {case:<28} {mode:<30} {r.impl:<30} {r.ms:9.3f} {gb:>7} {sp:>8}"
                  + (f"  {r.notes}" if r.notes else ""), file=file)


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
