"""Attention pooling benchmark (same as `python -m maskattn.bench --suite pool`)."""
import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "pool", *sys.argv[1:]]))
