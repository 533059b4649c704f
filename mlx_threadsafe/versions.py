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
    # editable installs write one): importing importlib.metadata (with email) would cost
    # install() about 25 ms. importlib.metadata answers where no such folder is found.
    prefix = name.replace("-", "_").lower() + "-"
    for folder in sys.path:
        for entry in _entries(folder):
            if entry.endswith(".dist-info") and entry.lower().startswith(prefix):
                return entry[len(prefix):-len(".dist-info")]
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_listed: Dict[str, List[str]] = {}


def _entries(folder: str) -> List[str]:
    if folder not in _listed:
        try:
            _listed[folder] = os.listdir(folder or ".")
        except OSError:  # not a folder (a zip file), or gone
            _listed[folder] = []
    return _listed[folder]


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
