"""Benchmark of masked_softmax (the same as `python -m maskattn.bench --suite masked_softmax`)."""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "masked_softmax", *sys.argv[1:]]))
