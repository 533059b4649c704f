"""One virtual environment per conformance target, made by harness.venvs.

Each lives in `.venvs/conformance/<name>-<recipe digest>` (git-ignored) and holds the
target, mlx for the CPU (the newest of compat_matrix/releases.toml) and this package
installed editable, so the shim under test is always the working tree. What this module
adds is what third-party servers need and the release venvs do not: uv overrides (to
drop a requirement that cannot install here, such as `mflux`, whose Linux wheels pin
mlx < 0.32, or `torchvision`) and a CPU build of torch where one lies on this machine.

A changed recipe (requirements, overrides, Python, packaging) makes a new venv.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from compat_matrix.releases import NEWEST_MLX
from harness.venvs import ROOT, VENVS, CannotInstall, venv_python

CONFORMANCE_VENVS = os.path.join(VENVS, "conformance")
NEVER = "; sys_platform == 'never'"  # a uv override with a marker that is never true drops the requirement

__all__ = ["CannotInstall", "NEWEST_MLX", "ROOT", "CONFORMANCE_VENVS", "NEVER", "target_python",
           "local_cpu_torch", "versions_in"]


def _find_links_dirs() -> List[str]:
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if os.path.isdir(d)]
    return dirs or [d for d in ("/opt/wheels",) if os.path.isdir(d)]


def local_cpu_torch() -> Optional[str]:
    """A `torch==X+cpu` override when a CPU-only torch wheel for this Python lies on this machine.

    From PyPI, torch for Linux x86-64 is the CUDA build (several GiB with its nvidia-*
    wheels); the CPU build lives on PyTorch's own index, which is not reachable here.
    Without a local wheel, torch comes from PyPI as the resolver picks it.
    """
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for directory in _find_links_dirs():
        for wheel in sorted(glob.glob(os.path.join(directory, f"torch-*+cpu-{tag}-*.whl")), reverse=True):
            return "torch==" + os.path.basename(wheel).split("-")[1]
    return None


def target_python(name: str, requirements: Sequence[str], overrides: Sequence[str] = (),
                  cpu_torch: bool = False, mlx: str = NEWEST_MLX) -> str:
    """The interpreter of the venv of target `name`, built first if missing.

    `requirements` are resolved together with mlx[cpu]==`mlx`, tokenizers and this package
    (editable); `overrides` are uv override lines (`pkg` + NEVER drops pkg). `cpu_torch`
    pins torch to a local CPU wheel when one exists. Raises CannotInstall with the
    resolver's last lines.
    """
    overrides = list(overrides)
    find_links: List[str] = []
    torch_pin = local_cpu_torch() if cpu_torch else None
    if torch_pin:
        overrides.append(torch_pin)
        find_links = _find_links_dirs()
    return venv_python(name, [f"mlx[cpu]=={mlx}", *requirements, "tokenizers"], overrides, find_links,
                       where=CONFORMANCE_VENVS)


def versions_in(python: str, packages: Sequence[str]) -> Dict[str, Optional[str]]:
    """The installed version of each package in that interpreter's environment (None if absent)."""
    code = ("import json, sys, importlib.metadata as m\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
