"""Benchmark of masked_channel_attention_pool (the same as `python -m maskattn.bench --suite masked_channel_attention_pool`)."""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "masked_channel_attention_pool", *sys.argv[1:]]))
