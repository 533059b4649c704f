"""What is installed, read from package metadata so that nothing gets imported.

`install()` must not import mlx, mlx-lm or mlx-vlm (they are slow to import and the
application may never use them), so every fact here comes from their metadata.
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple
from functools import lru_cache
from typing import Dict, List, Optional

from packaging.version import InvalidVersion, Version

TRACKED = ("mlx", "mlx-lm", "mlx-vlm")

# mlx ties a stream (and every unevaluated array) to the thread that created it from
# these releases on: the Metal and CUDA command encoders became thread-local in 0.31.2
# (mlx #3348, #3367), the CPU encoder only in 0.32.0 (mlx #3537).
THREAD_BOUND_SINCE = {"metal": Version("0.31.2"), "cuda": Version("0.31.2"), "cpu": Version("0.32.0")}


def distribution_version(name: str) -> Optional[str]:
    # The version in the name of the installed `<name>-<version>.dist-info` folder (wheel and
    # editable installs write one). importlib.metadata (with email) costs install() about
    # 25 ms, and a miss costs it a scan of every path entry: it answers only where a folder
    # does not say (an .egg-info, a zip file on sys.path).
    key = name.replace("-", "_").lower()
    ask_metadata = False
    for folder in sys.path:
        index = _index(folder)
        if index is None:
            ask_metadata = True
        elif key in index.dist_info:
            return index.dist_info[key]
        elif key in index.egg_info:
            ask_metadata = True
    if not ask_metadata:
        return None
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# A sys.path folder's metadata folders by lowercased distribution name (the part before the
# first "-"): the version of each .dist-info (the first listed), the names with an .egg-info.
FolderIndex = namedtuple("FolderIndex", "dist_info egg_info")
_indexed: Dict[str, Optional[FolderIndex]] = {}


def _index(folder: str) -> Optional[FolderIndex]:
    """The metadata folders in a sys.path folder, listed once (the only cache): detect() asks for six names."""
    if folder not in _indexed:
        entries = _entries(folder)
        _indexed[folder] = None if entries is None else _index_of(entries)
    return _indexed[folder]


def _index_of(entries: List[str]) -> FolderIndex:
    dist_info: Dict[str, str] = {}
    egg_info = set()
    for entry in entries:
        lowered = entry.lower()
        if lowered.endswith(".dist-info") and "-" in lowered[:-len(".dist-info")]:
            dist_info.setdefault(lowered.partition("-")[0], entry[lowered.index("-") + 1:-len(".dist-info")])
        elif lowered.endswith(".egg-info"):
            egg_info.add(lowered[:-len(".egg-info")].partition("-")[0])
    return FolderIndex(dist_info, egg_info)


def _entries(folder: str) -> Optional[List[str]]:
    """The names in a sys.path folder; [] if it is gone, None if it is not a folder (a zip file)."""
    try:
        return os.listdir(folder or ".")
    except (FileNotFoundError, PermissionError):
        return []
    except OSError:
        return None


def parse(version: Optional[str]) -> Optional[Version]:
    if version is None:
        return None
    try:
        return Version(version)
    except InvalidVersion:
        return None


def mlx_backend() -> str:
    """The backend the installed mlx runs on: 'metal', 'cuda' or 'cpu'."""
    if sys.platform == "darwin":
        return "metal"
    for dist in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        if distribution_version(dist) is not None:
            return "cuda"
    return "cpu"


class Environment(namedtuple("Environment", "mlx mlx_lm mlx_vlm backend")):
    """The installed mlx, mlx-lm, mlx-vlm (None: not installed) and mlx's backend.

    A named tuple, not a dataclass: dataclasses imports inspect, a cost every install() would pay.
    """

    __slots__ = ()

    def version_of(self, package: str) -> Optional[str]:
        return {"mlx": self.mlx, "mlx-lm": self.mlx_lm, "mlx-vlm": self.mlx_vlm}[package]

    @property
    def streams_bound_to_threads(self) -> bool:
        mlx = parse(self.mlx)
        return mlx is not None and mlx >= THREAD_BOUND_SINCE[self.backend]

    def describe(self) -> str:
        def show(v):
            return v or "not installed"

        return (
            f"mlx {show(self.mlx)} ({self.backend}), "
            f"mlx-lm {show(self.mlx_lm)}, mlx-vlm {show(self.mlx_vlm)}"
        )


@lru_cache(maxsize=1)
def detect() -> Environment:
    return Environment(
        mlx=distribution_version("mlx"),
        mlx_lm=distribution_version("mlx-lm"),
        mlx_vlm=distribution_version("mlx-vlm"),
        backend=mlx_backend(),
    )
