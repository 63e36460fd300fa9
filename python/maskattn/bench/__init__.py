"""maskattn against the layers it replaces: ``python -m maskattn.bench``.

Every suite times, case by case, the user's layer written in plain PyTorch (eager, and under
``torch.compile``), maskattn's replacement and, where there is one, the memory floor; the report
ends with one verdict per layer replaced. ``python -m maskattn.bench --help`` lists the options.

Adding a suite
--------------
A suite is a module ``maskattn/bench/<name>.py`` listed in ``SUITES`` in ``__main__.py`` (``<name>``
is what ``--suite`` takes). It defines::

    def cases(args) -> Iterable[Case]      # a generator: each case's tensors live only while it is timed
    def add_args(parser) -> None           # optional: suite-specific command-line options

``args`` carries ``device`` (a ``torch.device``), ``quick`` (smaller shapes) and ``no_compile``.
Each case is::

    Case(layer, case, mode, impls, detail="", bytes_moved=None)
      layer        Layer(name, replacement): the summary groups cases by it, e.g.
                   Layer("CLAM/ABMIL AttentionAggregator pooling", "maskattn.masked_attention_pool")
      case         the shape / configuration, e.g. "B=8 N=2400 D=512 float32"
      mode         "fwd" or "fwd+bwd" (the summary's two columns); detail says more ("frozen features")
      bytes_moved  the least bytes the op must move, for GB/s
      impls        [Impl(name, fn, role, threads=None, note="")], fn a zero-argument callable doing one
                   call's work (None when unavailable here, with the reason in note); role is one of
                     BASELINE   the layer replaced, eager: what "vs eager" divides by (one per case)
                     COMPILED   the same under torch.compile (maybe_compile(fn, not args.no_compile))
                     MASKATTN   the replacement the summary is about (one per case)
                     VARIANT    another maskattn configuration: shown with its ratios, not summarised
                     FLOOR      the least memory traffic, as a plain torch op: what "vs floor" divides
                     REFERENCE  anything else worth a row

Name implementations by what they are: the baseline after the model or paper its code comes
from ("CLAM/ABMIL AttentionAggregator (eager)"), maskattn's after its function or module.

The harness (``_harness.measure``) warms every implementation up (compiling the compiled one),
times them interleaved in rounds until every median settles or the case's time bound is hit,
and fills in the medians, spreads and ratios; ``__main__`` prints each suite's table as it ends,
then a legend and one summary per layer (``_harness.summarize``), and writes ``--json``,
``--markdown`` and ``--plot`` output. Exceptions raised by an implementation are caught and shown
in its row.
"""

from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, REFERENCE, VARIANT, Case, Impl, Layer, maybe_compile

__all__ = [
    "BASELINE",
    "COMPILED",
    "FLOOR",
    "MASKATTN",
    "REFERENCE",
    "VARIANT",
    "Case",
    "Impl",
    "Layer",
    "maybe_compile",
]
