import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "softmax", *sys.argv[1:]]))
