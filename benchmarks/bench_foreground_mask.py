"""Benchmark of foreground_mask (the same as `python -m maskattn.bench --suite foreground_mask`)."""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "foreground_mask", *sys.argv[1:]]))
