"""python -m maskattn.bench: maskattn side by side with each layer it replaces, and a verdict per layer.

Progress goes to stderr; the report (legend, one table per suite, legend, summary) to stdout, the
summary last.
"""

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
import time

import torch

import maskattn

from . import _harness as H

# Suite modules in maskattn.bench, named after the op (or model) they benchmark; the package
# docstring describes what a suite module defines.
SUITES = [
    "masked_attention_pool",
    "masked_channel_attention_pool",
    "attention_pooling",
    "masked_softmax",
    "scaled_cross_attention",
    "foreground_mask",
    "gated_masked_mean",
    "jit_block",
]


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "maskattn": maskattn.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    # Fresh gradients are first-touched memory: whether huge pages are on moves the fwd+bwd rows.
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            info["transparent_hugepage"] = fh.read().strip()
    except OSError:
        pass
    return info


def _busy(m: dict) -> bool:
    return "load_average_end" in m and bool(m["cpu_count"]) and m["load_average_end"][0] > m["cpu_count"]


def _info_line(m: dict) -> str:
    return (
        f"maskattn {m['maskattn']} | torch {m['torch']} | {m['processor']}, {m['cpu_count']} cpus | "
        f"threads {m['torch_threads']} | device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + (" | clock: process CPU time" if m.get("clock") == "cpu" else "")
    )


def parser(mods) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maskattn.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites (repeatable)")
    p.add_argument("--device", default="cuda" if maskattn.cuda_available() else "cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, short timing, no torch.compile unless --compile (a smoke test: tens of seconds)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time the baselines under torch.compile too (the default, except with --quick)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd baselines")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds of timed calls per implementation and case, at least (default 0.2; --quick 0.02)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds of timing per case before it stops even if the medians have not settled (default 2; --quick 0.3)",
    )
    p.add_argument("--tol", type=float, default=0.03, help="settled: each median's 95%% CI within +-TOL (0.03)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: the process's CPU time, which leaves out the time spent "
        "waiting for a core on a busy host (with one thread it is the work done; with more it adds the "
        "threads' times)",
    )
    p.add_argument("--json", metavar="FILE", help="write every row, the summary, machine and command line as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables and the summary as Markdown")
    p.add_argument(
        "--plot",
        metavar="PNG",
        nargs="?",
        const="maskattn_speedup.png",
        help="write a speedup plot of every suite (needs matplotlib: pip install matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    for m in mods.values():
        if hasattr(m, "add_args"):
            m.add_args(p)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mods = {name: importlib.import_module(f"maskattn.bench.{name}") for name in SUITES}
    args = parser(mods).parse_args(argv)
    args.device = torch.device(args.device)
    if args.clock == "cpu" and args.device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time: it needs --device cpu")
    # Compiling the baselines takes minutes on a small machine: --quick leaves it out unless asked.
    args.no_compile = not (args.compile if args.compile is not None else not args.quick)
    if args.plot:
        from ._plot import check_matplotlib

        check_matplotlib()  # fail before the run, not after it
    settings = H.Settings(
        device=args.device,
        min_time=args.min_time if args.min_time is not None else (0.02 if args.quick else 0.2),
        max_time=args.max_time if args.max_time is not None else (0.3 if args.quick else 2.0),
        min_rounds=5 if args.quick else 7,
        tol=args.tol,
        clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        progress=None if args.quiet else sys.stderr,
    )
    machine = _machine(args.device)
    machine["clock"] = args.clock
    started = datetime.datetime.now(datetime.timezone.utc)
    print(_info_line(machine))
    print(H.format_legend(), flush=True)

    rows = []
    for name in args.suite or SUITES:
        suite_rows = []
        for case in mods[name].cases(args):
            suite_rows += H.measure(case, settings, name)
        rows += suite_rows
        print(f"\n== {name}")
        print(H.format_table(suite_rows), flush=True)
    summaries = H.summarize(rows)
    duration = time.perf_counter() - settings.t0
    if "load_average" in machine:
        machine["load_average_end"] = list(os.getloadavg())

    command = "python -m maskattn.bench " + " ".join(argv)
    if args.json:
        doc = {
            "schema": "maskattn.bench/1",
            "command": command,
            "argv": argv,
            "started_utc": started.isoformat(timespec="seconds"),
            "duration_s": round(duration, 1),
            "machine": machine,
            "settings": {
                "min_time_s": settings.min_time,
                "max_time_s": settings.max_time,
                "min_rounds": settings.min_rounds,
                "tol": settings.tol,
                "quick": args.quick,
                "compile": not args.no_compile,
                "noisy_ratio_iqr": H.NOISY_RATIO_IQR,
                "win": H.WIN,
                "loss": H.LOSS,
            },
            "legend": H.LEGEND[1:],
            "rows": H.rows_to_json(rows),
            "summary": [dataclasses.asdict(s) for s in summaries],
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"{_info_line(machine)}\n\nCommand: `{command}` ({duration:.0f} s)\n\n")
            fh.write(H.markdown_table(rows) + "\n\n")
            fh.write(H.markdown_summary(summaries) + "\n")
    if args.plot:
        from ._plot import plot_speedup

        plot_speedup(rows, args.plot)
    written = [f for f in (args.json, args.markdown, args.plot) if f]

    print()
    print(H.format_legend())
    print()
    print(
        f"{_info_line(machine)} | {duration:.0f} s"
        + (f" | load average {machine['load_average_end'][0]:.1f}" if "load_average_end" in machine else "")
        + (" (busy host: more runnable processes than cpus, expect unreliable ratios)" if _busy(machine) else "")
        + (f" | wrote {', '.join(written)}" if written else "")
    )
    print(H.format_summary(summaries), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
