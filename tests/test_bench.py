"""The benchmark harness (maskattn.bench) on fake implementations driven by a fake clock: interleaving,
ratios and their direction, the unreliable marker, the time bound, the summary's verdicts, the JSON
report; and one real suite end to end in a subprocess (--quick --no-compile). No timing claims."""

import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch

from maskattn.bench import BASELINE, COMPILED, FLOOR, MASKATTN, REFERENCE, VARIANT, Case, Impl, Layer
from maskattn.bench import _harness as H


class FakeClock:
    """Time advances only when a fake implementation says it ran."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def runner(self, durations_ms, log=None, name=None):
        """A zero-argument fn that takes the next of ``durations_ms`` (cycled) per call."""
        it = itertools.cycle(durations_ms)

        def fn():
            if log is not None:
                log.append(name)
            self.t += next(it) / 1e3

        return fn


def settings(clock, **kw):
    base = dict(
        device=torch.device("cpu"),
        min_time=0.0,
        max_time=10.0,
        min_rounds=5,
        tol=0.03,
        sample_time=0.0,  # one call per sample
        warmup=1,
        clock=clock,
        progress=io.StringIO(),
    )
    base.update(kw)
    return H.Settings(**base)


LAYER = Layer("test layer", "maskattn.test_op")


def by_impl(rows):
    return {r.impl: r for r in rows}


def test_ratios_direction_and_values():
    clock = FakeClock()
    ms = {"eager": 4.0, "compiled": 3.0, "ours": 2.0, "floor": 1.0}
    case = Case(
        LAYER,
        "N=1",
        "fwd",
        [
            Impl("eager", clock.runner([ms["eager"]]), BASELINE),
            Impl("compiled", clock.runner([ms["compiled"]]), COMPILED),
            Impl("ours", clock.runner([ms["ours"]]), MASKATTN),
            Impl("floor", clock.runner([ms["floor"]]), FLOOR),
        ],
        bytes_moved=8_000_000,
    )
    rows = by_impl(H.measure(case, settings(clock), "suite"))
    for name, t in ms.items():
        assert rows[name].median_ms == pytest.approx(t)
        assert rows[name].rel_iqr == pytest.approx(0.0)
        assert rows[name].settled
        assert rows[name].gbps == pytest.approx(8_000_000 / (t / 1e3) / 1e9)
    ours = rows["ours"]
    # > 1 means maskattn is faster than the reference
    assert ours.vs_eager == pytest.approx(ms["eager"] / ms["ours"]) and ours.vs_eager > 1
    assert ours.vs_compiled == pytest.approx(ms["compiled"] / ms["ours"])
    assert ours.vs_floor == pytest.approx(ms["floor"] / ms["ours"]) and ours.vs_floor < 1
    assert rows["eager"].vs_eager == pytest.approx(1.0)
    assert rows["compiled"].vs_compiled is None  # only maskattn rows get "vs compiled"
    assert not any(r.vs_eager_unreliable or r.vs_compiled_unreliable or r.vs_floor_unreliable for r in rows.values())


def test_interleaved_rounds_rotate():
    clock = FakeClock()
    log = []
    names = ["a", "b", "c"]
    case = Case(
        LAYER, "c", "fwd", [Impl(n, clock.runner([1.0], log, n), MASKATTN if n == "a" else REFERENCE) for n in names]
    )
    rows = H.measure(case, settings(clock, min_rounds=4), "suite")
    timed = log[len(names) :]  # after one warm-up call each
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert len(rounds) == rows[0].n >= 4
    for k, r in enumerate(rounds):
        assert r == names[k % 3 :] + names[: k % 3]
    assert {r.n for r in rows} == {len(rounds)}


def test_unreliable_marker():
    clock = FakeClock()
    # "noisy": its per-round ratio to the baseline spreads far beyond +-10 %; "clean": a few percent
    case = Case(
        LAYER,
        "c",
        "fwd",
        [
            Impl("eager", clock.runner([4.0, 4.1, 3.9]), BASELINE),
            Impl("noisy", clock.runner([1.0, 3.0, 2.0, 1.5, 2.5]), VARIANT),
            Impl("clean", clock.runner([2.0, 2.02, 1.98]), MASKATTN),
        ],
    )
    rows = by_impl(H.measure(case, settings(clock, max_time=0.3), "suite"))
    noisy, clean = rows["noisy"], rows["clean"]
    lo, hi = noisy.vs_eager_band
    assert hi - lo > H.NOISY_RATIO_IQR * noisy.vs_eager and noisy.vs_eager_unreliable
    lo, hi = clean.vs_eager_band
    assert hi - lo < H.NOISY_RATIO_IQR * clean.vs_eager and not clean.vs_eager_unreliable
    table = H.format_table(list(rows.values()))
    clean_line = next(line for line in table.splitlines() if line.strip().startswith("clean"))
    noisy_line = next(line for line in table.splitlines() if line.strip().startswith("noisy"))
    assert f"{noisy.vs_eager:.2f}x?" in noisy_line
    assert f"{clean.vs_eager:.2f}x" in clean_line and "?" not in clean_line


def test_common_slowdown_cancels_out_of_the_ratio():
    """A slow spell that hits every implementation of a round alike leaves each round's ratio, and
    so the reported ratio, unchanged, although every timing alone is noisy."""
    clock = FakeClock()
    slow = [1.0, 1.0, 3.0, 1.0, 5.0, 1.0, 1.0, 2.0]  # the host's slowdown, round by round
    case = Case(
        LAYER,
        "c",
        "fwd",
        [
            Impl("eager", clock.runner([6.0 * f for f in slow]), BASELINE),
            Impl("ours", clock.runner([2.0 * f for f in slow]), MASKATTN),
        ],
    )
    rows = by_impl(H.measure(case, settings(clock, warmup=len(slow), max_time=0.5), "suite"))
    ours = rows["ours"]
    assert ours.rel_iqr > 0.5 and rows["eager"].rel_iqr > 0.5
    assert ours.vs_eager == pytest.approx(3.0) and not ours.vs_eager_unreliable
    assert ours.vs_eager_band == pytest.approx([3.0, 3.0])


def test_time_bound_stops_an_unsettled_case():
    clock = FakeClock()
    case = Case(
        LAYER,
        "c",
        "fwd",
        [Impl("eager", clock.runner([1.0, 5.0]), BASELINE), Impl("ours", clock.runner([2.0, 9.0, 3.0]), MASKATTN)],
    )
    max_time = 0.2
    rows = H.measure(case, settings(clock, max_time=max_time, min_rounds=3), "suite")
    assert all(not r.settled for r in rows)
    round_s = (5.0 + 9.0) / 1e3  # the longest a round can take
    assert clock.t <= max_time + round_s + 0.05  # warm-up included
    assert rows[0].n >= 3


def test_settles_early_when_quiet():
    clock = FakeClock()
    case = Case(
        LAYER, "c", "fwd", [Impl("eager", clock.runner([1.0]), BASELINE), Impl("ours", clock.runner([0.5]), MASKATTN)]
    )
    rows = H.measure(case, settings(clock, min_rounds=6, max_time=100.0), "suite")
    assert all(r.settled for r in rows)
    assert rows[0].n == 6  # constant timings settle at the first round allowed


def test_failing_implementation_is_reported_not_fatal():
    clock = FakeClock()

    def broken():
        raise RuntimeError("no kernel for this dtype")

    case = Case(
        LAYER,
        "c",
        "fwd",
        [
            Impl("eager", clock.runner([1.0]), BASELINE),
            Impl("compiled", broken, COMPILED),
            Impl("ours", clock.runner([0.5]), MASKATTN),
            Impl("absent", None, REFERENCE, note="needs opencv"),
        ],
    )
    rows = by_impl(H.measure(case, settings(clock), "suite"))
    assert not rows["compiled"].ok and "RuntimeError" in rows["compiled"].note
    assert not rows["absent"].ok and rows["absent"].note == "needs opencv"
    assert rows["ours"].vs_eager == pytest.approx(2.0) and rows["ours"].vs_compiled is None
    table = H.format_table(list(rows.values()))
    assert "no kernel for this dtype" in table and "needs opencv" in table


def test_case_validation():
    with pytest.raises(ValueError, match="mode"):
        Case(LAYER, "c", "backward", [])
    with pytest.raises(ValueError, match="role"):
        Case(LAYER, "c", "fwd", [Impl("x", lambda: None, "fastest")])
    with pytest.raises(ValueError, match="more than one"):
        Case(LAYER, "c", "fwd", [Impl("x", lambda: None, MASKATTN), Impl("y", lambda: None, MASKATTN)])


@pytest.mark.parametrize(
    "fwd, fwd_bwd, start",
    [
        (2.0, 3.0, "SWITCH"),
        (1.0, 3.0, "SWITCH for training (fwd+bwd); forward alone is no faster"),
        (0.5, 3.0, "SWITCH for training (fwd+bwd); forward alone is slower"),
        (3.0, 0.95, "SWITCH for inference (fwd only); fwd+bwd is no faster"),
        (1.0, 1.05, "NO SPEED GAIN"),
        (0.5, 1.0, "KEEP the layer"),
        (None, 2.0, "SWITCH"),
        (None, None, "no verdict"),
    ],
)
def test_verdict(fwd, fwd_bwd, start):
    v = H.verdict(fwd, fwd_bwd)
    assert v.startswith(start)
    if start == "SWITCH":
        assert v == "SWITCH"


def _layer_rows(clock, layer, fwd_ms, bwd_ms, noisy=False):
    """Cases of one layer; fwd_ms / bwd_ms: [(eager ms, maskattn ms)] per case."""
    rows = []
    for mode, pairs in (("fwd", fwd_ms), ("fwd+bwd", bwd_ms)):
        for i, (e, m) in enumerate(pairs):
            jitter = [1.0, 1.6, 0.7] if noisy else [1.0]
            case = Case(
                layer,
                f"N={i}",
                mode,
                [
                    Impl(f"{layer.name} (eager)", clock.runner([e]), BASELINE),
                    Impl(f"{layer.name} (compiled)", clock.runner([e / 2]), COMPILED),
                    Impl(layer.replacement, clock.runner([m * j for j in jitter]), MASKATTN),
                ],
            )
            rows += H.measure(case, settings(clock, max_time=0.5), "suite")
    return rows


def test_summary_geomean_worst_case_and_verdict():
    clock = FakeClock()
    fast = Layer("fast layer", "maskattn.fast")
    train = Layer("training layer", "maskattn.train")
    slow = Layer("slow layer", "maskattn.slow")
    rows = _layer_rows(clock, fast, [(4.0, 2.0), (16.0, 2.0)], [(9.0, 3.0)])
    rows += _layer_rows(clock, train, [(2.0, 2.0)], [(6.0, 2.0), (6.0, 3.0)])
    rows += _layer_rows(clock, slow, [(1.0, 2.0)], [], noisy=True)
    sums = {s.layer: s for s in H.summarize(rows)}
    assert list(sums) == ["fast layer", "training layer", "slow layer"]

    f = sums["fast layer"]
    assert f.fwd == pytest.approx(math.sqrt((4 / 2) * (16 / 2)))  # geometric mean over cases
    assert f.fwd_bwd == pytest.approx(3.0)
    assert f.fwd_compiled == pytest.approx(math.sqrt((2 / 2) * (8 / 2)))
    assert f.worst == pytest.approx(2.0) and "N=0" in f.worst_case and f.worst_case.startswith("fwd")
    assert f.verdict == "SWITCH" and f.n_ratios == 3 and f.n_unreliable == 0

    t = sums["training layer"]
    assert t.verdict.startswith("SWITCH for training")
    assert t.worst == pytest.approx(1.0)

    s = sums["slow layer"]
    assert s.fwd_bwd is None and s.n_fwd_bwd == 0
    assert s.verdict.startswith("KEEP") and s.n_unreliable == 1 and "uncertain" in s.verdict

    text = H.format_summary(H.summarize(rows)).splitlines()
    assert text[0].startswith("Summary")
    assert any(line.startswith("* fast layer -> maskattn.fast: SWITCH") for line in text)
    assert any(f"fwd {f.fwd:.2f}x vs eager ({f.fwd_compiled:.2f}x vs compiled)" in line for line in text)
    slow_detail = text[text.index(next(line for line in text if line.startswith("* slow layer"))) + 1]
    assert f"worst {s.worst:.2f}x?" in slow_detail and "1 of 1 ratios ?" in slow_detail


def test_summary_without_baseline_says_why():
    clock = FakeClock()
    case = Case(
        LAYER,
        "c",
        "fwd",
        [
            Impl("opencv", None, BASELINE, note="opencv-python-headless not installed"),
            Impl("ours", clock.runner([1.0]), MASKATTN),
        ],
    )
    (s,) = H.summarize(H.measure(case, settings(clock), "suite"))
    assert s.worst is None and "opencv-python-headless not installed" in s.verdict


def test_median_ci_contains_median_and_narrows():
    xs = [float(i) for i in range(1, 101)]
    lo, hi = H.median_ci(xs)
    med = sum(xs) / len(xs)
    assert lo < med < hi
    lo_small, hi_small = H.median_ci(xs[::10])
    assert (hi - lo) / med < (hi_small - lo_small) / med


def _fake_suite():
    mod = types.ModuleType("maskattn.bench.fake")

    def cases(args):
        for mode in ("fwd", "fwd+bwd"):
            yield Case(
                LAYER,
                "N=3",
                mode,
                [Impl("eager", lambda: sum(range(200)), BASELINE), Impl("ours", lambda: sum(range(20)), MASKATTN)],
            )

    mod.cases = cases
    return mod


def test_main_json_markdown_and_last_lines(tmp_path, monkeypatch, capsys):
    from maskattn.bench import __main__ as M

    monkeypatch.setitem(sys.modules, "maskattn.bench.fake", _fake_suite())
    monkeypatch.setattr(M, "SUITES", ["fake"])
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    argv = [
        "--suite",
        "fake",
        "--min-time",
        "0",
        "--max-time",
        "0.05",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
    ]
    assert M.main(argv) == 0
    stdout = capsys.readouterr().out.splitlines()
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "maskattn.bench/1"
    assert doc["argv"] == argv and doc["command"].endswith(" ".join(argv))
    assert doc["machine"]["torch"] == torch.__version__ and "cpu_count" in doc["machine"]
    assert doc["settings"]["max_time_s"] == 0.05
    assert len(doc["rows"]) == 4
    row_keys = {"suite", "layer", "replacement", "case", "mode", "impl", "role", "median_ms", "q1_ms", "q3_ms"}
    row_keys |= {"min_ms", "max_ms", "n", "samples_ms", "rel_iqr", "vs_eager", "vs_eager_unreliable", "vs_compiled"}
    for r in doc["rows"]:
        assert row_keys <= set(r)
        assert len(r["samples_ms"]) == r["n"] >= 3
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
    ours = [r for r in doc["rows"] if r["role"] == MASKATTN]
    eager = {r["mode"]: r["samples_ms"] for r in doc["rows"] if r["role"] == BASELINE}
    for r in ours:
        per_round = [e / o for e, o in zip(eager[r["mode"]], r["samples_ms"])]
        assert r["vs_eager"] == pytest.approx(statistics.median(per_round))
    (summ,) = doc["summary"]
    assert summ["layer"] == LAYER.name and summ["verdict"]
    # the verdict is in the last lines of the report
    assert stdout[-3].startswith("Summary")
    assert stdout[-2].startswith(f"* {LAYER.name} -> {LAYER.replacement}: ")
    assert "Legend:" in stdout[: stdout.index(next(x for x in stdout if x.startswith("== fake")))]
    assert sum(line == "Legend:" for line in stdout) == 2
    md = out_md.read_text()
    assert "| fake | N=3 | fwd | **ours** |" in md and LAYER.replacement in md


def test_cpu_clock_is_used_and_recorded(tmp_path, monkeypatch, capsys):
    from maskattn.bench import __main__ as M

    monkeypatch.setitem(sys.modules, "maskattn.bench.fake", _fake_suite())
    monkeypatch.setattr(M, "SUITES", ["fake"])
    used = []
    real = time.process_time
    monkeypatch.setattr(M.time, "process_time", lambda: used.append(1) or real())
    out_json = tmp_path / "r.json"
    argv = ["--suite", "fake", "--min-time", "0", "--max-time", "0.05", "--clock", "cpu", "--json", str(out_json)]
    assert M.main(argv) == 0
    assert used, "the rounds were not timed with the process clock"
    assert "clock: process CPU time" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(out_json.read_text())["machine"]["clock"] == "cpu"
    with pytest.raises(SystemExit, match="--clock cpu measures host CPU time"):
        M.main(["--suite", "fake", "--clock", "cpu", "--device", "meta"])


def test_plot_needs_matplotlib_message(monkeypatch):
    from maskattn.bench import _plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        _plot.check_matplotlib()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from maskattn.bench._plot import plot_speedup

    clock = FakeClock()
    rows = _layer_rows(clock, LAYER, [(4.0, 2.0), (3.0, 2.0)], [(5.0, 2.0)])
    path = plot_speedup(rows, str(tmp_path / "p.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_suite_end_to_end(tmp_path):
    """One real suite, the way CI's smoke test runs it, in a fresh interpreter."""
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "maskattn.bench", "--suite", "gated_masked_mean", "--quick", "--no-compile"]
    cmd += ["--min-time", "0.01", "--max-time", "0.1", "--json", str(out_json)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    doc = json.loads(out_json.read_text())
    layers = [s["layer"] for s in doc["summary"]]
    assert len(layers) == 2
    # the last lines: the summary header, then two lines per layer replaced
    assert lines[-5].startswith("Summary")
    for name in layers:
        assert any(line.startswith(f"* {name} -> maskattn.") for line in lines[-4:])
    # progress for every case on stderr
    for r in doc["rows"]:
        assert f"gated_masked_mean | {r['case']} |" in p.stderr
    assert "seed" not in (p.stdout + p.stderr).lower()


def test_failure_during_the_rounds_drops_only_that_implementation():
    clock = FakeClock()
    calls = {"n": 0}

    def fails_on_fourth_call():
        calls["n"] += 1
        if calls["n"] == 4:
            raise MemoryError("out of memory")
        clock.t += 1e-3

    case = Case(
        LAYER,
        "c",
        "fwd",
        [
            Impl("eager", clock.runner([2.0]), BASELINE),
            Impl("flaky", fails_on_fourth_call, VARIANT),
            Impl("ours", clock.runner([1.0]), MASKATTN),
        ],
    )
    rows = by_impl(H.measure(case, settings(clock), "suite"))
    assert not rows["flaky"].ok and "MemoryError" in rows["flaky"].note
    assert rows["ours"].n == rows["eager"].n >= 5
    assert rows["ours"].vs_eager == pytest.approx(2.0)


def test_jit_block_suite_cases_run_and_agree():
    """The JiT training-step suite on a tiny configuration: every implementation runs a step, and
    the suite itself refuses to time implementations whose losses disagree."""
    from maskattn.bench import jit_block

    args = types.SimpleNamespace(
        device=torch.device("cpu"),
        quick=True,
        no_compile=True,
        jit_size=32,
        jit_batch=2,
        jit_dtype=None,
        jit_padding="0,0.5",
    )
    cases = list(jit_block.cases(args))
    pads = [int(c.case.split(" pad=")[1].split("%")[0]) for c in cases]
    assert pads[0] == 0 and 40 <= pads[1] <= 60  # sizes snap to the patch grid
    for case in cases:
        assert case.mode == "fwd+bwd"
        assert [im.role for im in case.impls] == [BASELINE, REFERENCE, MASKATTN]
        for im in case.impls:
            grads = im.fn()
            assert all(torch.isfinite(g).all() for g in grads)
    # the padded fraction the case names is the one the masks have
    m = jit_block.image_masks(4, 128, 8, 0.4, "cpu")
    assert abs((1 - m.mean().item()) - 0.4) < 0.03
    assert bool((jit_block.image_masks(2, 32, 8, 0.0, "cpu") == 1).all())


def test_channel_pool_suite_cases_run_and_agree():
    """The PyG feature-level-gate suite on its quick shapes: every implementation runs, and the
    baseline (torch_geometric's code, or the plain-torch scatter softmax without it) gives the op's
    pooled output and gradients."""
    from maskattn.bench import masked_channel_attention_pool as suite

    args = types.SimpleNamespace(device=torch.device("cpu"), quick=True, no_compile=True, channel_pool_dtype="float64")
    modes = []
    for case in suite.cases(args):  # run as they come: a case's tensors live only until the next one
        modes.append(case.mode)
        assert [im.role for im in case.impls] == (
            [BASELINE, MASKATTN, FLOOR] if case.mode == "fwd" else [BASELINE, MASKATTN]
        )
        base, ours = case.impls[0].fn(), case.impls[1].fn()
        for a, b in zip(base, ours):
            assert a.abs().sum() > 0
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
    assert modes == ["fwd", "fwd+bwd", "fwd+bwd"] * len(suite.QUICK_SHAPES)
    # both baselines: torch_geometric's functions (when installed) and the plain-torch fallback
    gate, x, batch, ptr = suite.make(3, 40, 6, torch.float64, "cpu")
    ours = suite.ours_pool(gate, x, ptr)
    for fns in {suite._pyg_functions()[:2], (suite._softmax_torch, suite._scatter_sum_torch)}:
        for a, b in zip(suite.attentional_aggregation(*fns)(gate, x, batch, 3), ours):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
