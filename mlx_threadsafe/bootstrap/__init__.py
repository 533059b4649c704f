"""The directory `mlx-threadsafe run` puts first on PYTHONPATH; holds its sitecustomize."""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
