"""Benchmark of scaled_cross_attention (the same as `python -m maskattn.bench --suite scaled_cross_attention`)."""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "scaled_cross_attention", *sys.argv[1:]]))
