"""compat_matrix/releases.toml, read: the releases the matrix covers, their pins, the scenarios each runs."""

from __future__ import annotations

import os
from typing import Dict, List

from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "releases.toml"), "rb") as _source:
    RELEASES = tomllib.load(_source)
SCENARIOS_BY_PACKAGE: Dict[str, List[str]] = {package: list(table) for package, table in RELEASES["scenarios"].items()}
SCENARIO_PATCHES: Dict[str, List[str]] = {name: patches for table in RELEASES["scenarios"].values()
                                          for name, patches in table.items()}
# The newest mlx the matrix runs: what a venv gets unless it asks for another.
NEWEST_MLX: str = max(RELEASES["mlx"] + RELEASES.get("mlx-other", []), key=Version)
