"""Speedup-versus-N plot from benchmark rows (``python -m maskattn.bench --plot``)."""

import re


def plot_speedup(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from e
    series = {}
    groups = {}
    for r in rows:
        groups.setdefault((r.suite, r.case, r.mode), {})[r.impl] = r.ms
    for (suite, case, mode), impls in groups.items():
        m = re.search(r"\bN=(\d+)", case)
        if not m or "seed eager" not in impls or "maskattn" not in impls:
            continue
        n = int(m.group(1))
        for ref in ("seed eager", "seed compiled"):
            if ref in impls:
                series.setdefault((suite, mode, ref), []).append((n, impls[ref] / impls["maskattn"]))
    if not series:
        raise SystemExit("--plot: no rows with N=... and both seed and maskattn timings")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (suite, mode, ref), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{suite} {mode} vs {ref}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("N (rows per bag / sequence length)")
    ax.set_ylabel("speedup of maskattn (x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
