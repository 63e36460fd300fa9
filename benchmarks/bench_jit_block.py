"""A JiT-style training step on padded images, hand-written against maskattn's packed block route
(the same as `python -m maskattn.bench --suite jit_block`).

The JiT options may be given without their prefix: `--dtype`, `--size`, `--batch`, `--padding`, e.g.
on a GPU `python benchmarks/bench_jit_block.py --device cuda --dtype bfloat16 --size 256`; every
other option is the harness's (`--quick`, `--no-compile`, `--min-time`, `--json`, ...).
"""

import sys

from maskattn.bench.__main__ import main

SHORT = {"--dtype": "--jit-dtype", "--size": "--jit-size", "--batch": "--jit-batch", "--padding": "--jit-padding"}


def _translate(argv):
    out = []
    for a in argv:
        name, eq, value = a.partition("=")
        out.append(SHORT[name] + eq + value if name in SHORT else a)
    return out


sys.exit(main(["--suite", "jit_block", *_translate(sys.argv[1:])]))
