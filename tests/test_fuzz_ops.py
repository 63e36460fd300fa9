"""No input crashes the process: every registered op, the backward ops included, fed malformed
arguments in child processes (tests/_fuzz.py builds the cases from the op registry and says what
counts as a failure: a signal death or a hang, an exception type other than RuntimeError /
ValueError / TypeError / IndexError, an error that does not name the op, bad input accepted, a
valid sample refused, or a result that depends on the strides).

The cases are fixed (seeded) and run in two child processes at a time, a few thousand calls each;
a child that dies is replaced, and the case it died in is re-run alone so that the report names it.
"""

import math
import os
import signal
import sys
import time

import _fuzz
import pytest
import torch
from conftest import DEVICES

TESTS = os.path.dirname(os.path.abspath(__file__))


def _report(cases, problems, limit=40):
    # crashes and hangs first: they are what the test is for, and a report is cut at `limit`
    def severity(i):
        p = problems[i]
        return (0 if ("signal" in p or "hung" in p or "died" in p or "exited" in p) else 1, i)

    lines = []
    for i in sorted(problems, key=severity)[:limit]:
        where = cases[i].desc if 0 <= i < len(cases) else "(between cases)"
        lines.append(f"  case {i}: {where}\n      -> {problems[i]}")
    more = len(problems) - limit
    return "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")


@pytest.mark.parametrize("device", DEVICES)
def test_no_input_crashes_any_op(device, tmp_path):
    cases = _fuzz.op_cases(device)
    assert {c.op for c in cases} == {e.name for e in _fuzz.OPS}
    t0 = time.monotonic()
    problems = _fuzz.fuzz("_fuzz:op_cases", device, len(cases), str(tmp_path), TESTS)
    elapsed = time.monotonic() - t0
    assert not problems, (
        f"{len(problems)} of {len(cases)} fuzz cases on {device} misbehaved ({elapsed:.0f} s):\n"
        + _report(cases, problems)
    )


def test_cases_cover_the_malformations_of_the_issue():
    # The kinds of malformed argument the fuzz must generate, for every op where they apply.
    descs = {}
    for c in _fuzz.op_cases("cpu"):
        descs.setdefault(c.op, []).append(c.desc)
    for op, ds in descs.items():
        text = "\n".join(ds)
        for kind in ("unsqueeze(0)", "size(0) + 1", "dtype int64", "dtype complex64", "stride 2", "(all on meta)"):
            assert kind in text, f"{op}: no '{kind}' case"
        if "output_mask" in _fuzz.OPS_BY_NAME[op].arg_names:
            assert "output_mask = [True]" in text and "output_mask = [False, False" in text, op
        if "packed" in op:
            for kind in ("offsets[0] = -1", "offsets[-1] = T + 1", "non-monotone", "2^62", "offsets: dtype int32"):
                assert kind in text, f"{op}: no '{kind}' case"
    assert any("on meta" in d and "(all on meta)" not in d for ds in descs.values() for d in ds)
    assert any("2^40 + 1" in d for ds in descs.values() for d in ds)
    assert any(": None" in d for ds in descs.values() for d in ds)  # an optional tensor dropped
    assert any("for None" in d for ds in descs.values() for d in ds)  # and given where None was


# ------------------------------------------------------------------ the harness itself can fail


def _kill_self(sig):
    def build():
        os.kill(os.getpid(), sig)

    return build


def planted_cases(device):
    """A crash, a hang, a wrong exception type and a bad input accepted among good cases: what the
    harness must report, each under its own index, while still running the cases after them. The
    crash is a SIGKILL, which no handler can turn into something else (under tests/sanitize.sh,
    AddressSanitizer would catch a planted SIGSEGV, write a report and abort)."""
    ok = lambda: (torch.ones(2, 3), torch.ones(2, 3, 4), None)  # noqa: E731
    C = _fuzz.Case
    return [
        C("masked_attention_pool", "good", ok, must_run=True),
        C("masked_attention_pool", "killed", _kill_self(signal.SIGKILL)),
        C("masked_attention_pool", "hang", lambda: time.sleep(3600)),
        C("masked_attention_pool", "assertion", lambda: (_ for _ in ()).throw(AssertionError("planted"))),
        C("masked_attention_pool", "accepted when it must not be", ok, must_raise=True),
        C("masked_attention_pool", "good", ok, must_run=True),
    ]


def test_harness_reports_crashes_hangs_and_bad_exceptions(tmp_path):
    cases = planted_cases("cpu")
    problems = _fuzz.fuzz(
        "test_fuzz_ops:planted_cases", "cpu", len(cases), str(tmp_path), TESTS, shards=1, case_timeout=3.0
    )
    assert sorted(problems) == [1, 2, 3, 4], problems
    assert "SIGKILL" in problems[1]
    assert "hung" in problems[2]
    assert "AssertionError" in problems[3]
    assert problems[4] == "no error"


def test_run_case_rules():
    # run_case's own rules, checked in-process on known calls
    cases = [
        _fuzz.Case("patch_mask", "named", lambda: (torch.ones(2, 4, 4), 3, 0.5)),
        _fuzz.Case("patch_mask", "valid sample refused", lambda: (torch.ones(2, 4, 4), 3, math.nan), must_run=True),
        _fuzz.Case("patch_mask", "layout", lambda: (torch.ones(2, 4, 4).transpose(1, 2), 2, 0.5), layout_only=True),
    ]
    assert _fuzz.run_case(cases, 0, "cpu") == ""
    assert _fuzz.run_case(cases, 1, "cpu").startswith("a valid sample raised")
    assert _fuzz.run_case(cases, 2, "cpu") == ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
