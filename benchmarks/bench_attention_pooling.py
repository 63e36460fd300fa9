"""A CLAM-sized gated ABMIL head trained over many bags: CLAM's per-bag loop against
nn.AttentionPooling (packed and padded), and PyG's AttentionalAggregation when torch_geometric is
installed (otherwise those rows say so).

    python benchmarks/bench_attention_pooling.py            # 64 bags at medians 100, 800, 2000, 9000
    python benchmarks/bench_attention_pooling.py --mil-medians 100,800 --mil-bags 16

The same as ``python -m maskattn.bench --suite attention_pooling --mil-full``; every option of
``python -m maskattn.bench`` applies (``--no-compile``, ``--json``, ...).
"""

import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "attention_pooling", "--mil-full", *sys.argv[1:]]))
