import os
import sys

# the service module lives at the project root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
