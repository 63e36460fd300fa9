import sys
from maskattn.bench.__main__ import main
sys.exit(main(["--suite", "face", *sys.argv[1:]]))
