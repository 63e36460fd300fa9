import os
import sys

# the seed references live beside the tests
sys.path.insert(0, os.path.dirname(__file__))
