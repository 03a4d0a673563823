import os
import sys

# the tests import the loop reference as a plain module beside them
sys.path.insert(0, os.path.dirname(__file__))
