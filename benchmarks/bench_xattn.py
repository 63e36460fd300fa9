import sys

from maskattn.bench.__main__ import main

sys.exit(main(["--suite", "xattn", *sys.argv[1:]]))
