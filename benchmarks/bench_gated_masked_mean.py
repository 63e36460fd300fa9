"""Benchmark of gated_masked_mean (the same as `python -m maskattn.bench --suite gated_masked_mean`)."""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "gated_masked_mean", *sys.argv[1:]]))
