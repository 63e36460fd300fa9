"""Print, one per line, the schemas that the given csrc/<op>.cpp files define with TORCH_LIBRARY.

Scaffolding for the move to the stable ABI, deleted with the last unported op: a wheel whose
unported ops cannot load under the running torch still defines their schemas (without kernels) when
MASKATTN_STABLE_OPS_ONLY=1, so that the package imports and the ported ops can be tested there.
"""

import re
import sys

for path in sys.argv[1:]:
    src = open(path, encoding="utf-8").read()
    block = re.search(r"TORCH_LIBRARY_FRAGMENT\(maskattn, m\) \{(.*?)\n\}", src, re.S)
    if not block:
        continue
    for call in re.findall(r"m\.def\((.*?)\);", block.group(1), re.S):
        print("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)))
