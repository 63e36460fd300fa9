"""Speedup plot of every suite (``python -m maskattn.bench --plot FILE.png``; needs matplotlib)."""

from typing import Dict, List

from ._harness import MASKATTN, Row


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            '(from a clone of maskattn: pip install --no-build-isolation ".[plot]"); run without --plot for the text report'
        ) from e


def plot_speedup(rows: List[Row], path: str) -> str:
    """One panel per layer replaced: maskattn's speedup over the eager and the compiled baseline for
    every case, the whiskers spanning the quartiles of the per-round ratios, unreliable ratios hatched."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels: Dict[tuple, List[Row]] = {}
    for r in rows:
        if r.role == MASKATTN and r.vs_eager is not None:
            panels.setdefault((r.layer, r.replacement), []).append(r)
    if not panels:
        raise SystemExit("--plot: no case has both the layer it replaces and maskattn timed")
    from matplotlib.patches import Patch

    heights = [max(1.2, 0.32 * len(rs) + 0.9) for rs in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights)), gridspec_kw={"height_ratios": heights})
    axes = [axes] if len(panels) == 1 else list(axes)
    series = (("eager", "tab:blue", "vs eager"), ("compiled", "tab:orange", "vs compiled"))
    for ax, ((layer, repl), rs) in zip(axes, panels.items()):
        ys = list(range(len(rs)))[::-1]
        h = 0.38
        shown = []
        for off, (key, color, _) in zip((h / 2, -h / 2), series):
            for y, r in zip(ys, rs):
                v, band, unrel = (
                    getattr(r, f"vs_{key}"),
                    getattr(r, f"vs_{key}_band"),
                    getattr(r, f"vs_{key}_unreliable"),
                )
                if v is None:
                    continue
                shown.append(v)
                # bars grow from 1x: right of it maskattn is faster, left of it slower
                ax.barh(
                    y + off,
                    v - 1.0,
                    left=1.0,
                    height=h,
                    color=color,
                    alpha=0.45 if unrel else 0.9,
                    hatch="//" if unrel else None,
                )
                if band:
                    err = [[max(0.0, v - band[0])], [max(0.0, band[1] - v)]]
                    ax.errorbar(v, y + off, xerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        # Ratios on a log axis: 2x faster and 2x slower are the same distance from 1.
        ax.set_xscale("log")
        lo, hi = min(shown + [1.0]), max(shown + [1.0])
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{r.case} | {r.mode_label}" for r in rs], fontsize=7)
        ax.set_title(f"{layer} -> {repl}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(handles=[Patch(color=c, label=lab) for _, c, lab in series], fontsize=7, loc="lower right")
    axes[-1].set_xlabel(
        "speedup of maskattn (log scale): >1x = maskattn faster; whiskers: quartiles of the per-round ratios; "
        "hatched = unreliable (they spread by more than +-10 %)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
