"""One virtual environment per conformance target, made with `uv`.

Each lives in `.venvs/conformance/<name>` (git-ignored) and holds the target, mlx for
the CPU and this package installed editable, so the shim under test is always the
working tree. The helpers of `compat_matrix/venvs.py` (its root, the packaging digest,
`CannotInstall`) are reused by import; what this module adds is what third-party
servers need and the release venvs do not: uv overrides (to drop a requirement that
cannot install here, such as `mflux`, whose Linux wheels pin mlx < 0.32, or
`torchvision`) and a CPU build of torch where one lies on this machine.

A venv is rebuilt when its recipe (requirements, overrides, packaging digest) changes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from compat_matrix.venvs import NEWEST_MLX, ROOT, VENVS, CannotInstall, _packaging_digest

CONFORMANCE_VENVS = os.path.join(VENVS, "conformance")
NEVER = "; sys_platform == 'never'"  # a uv override with a marker that is never true drops the requirement

__all__ = ["CannotInstall", "NEWEST_MLX", "ROOT", "CONFORMANCE_VENVS", "NEVER", "target_python",
           "local_cpu_torch", "versions_in", "uv"]


def uv() -> str:
    found = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    if not os.path.exists(found):
        raise CannotInstall("uv is not installed (pip install uv)")
    return found


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
    """The interpreter of `.venvs/conformance/<name>`, built if missing or out of date.

    `requirements` are resolved together with mlx[cpu]==`mlx`, tokenizers and this package
    (editable); `overrides` are uv override lines (`pkg; sys_platform == 'never'` drops
    pkg). `cpu_torch` pins torch to a local CPU wheel when one exists. Raises
    CannotInstall with the resolver's last lines.
    """
    overrides = list(overrides)
    find_links: List[str] = []
    torch_pin = local_cpu_torch() if cpu_torch else None
    if torch_pin:
        overrides.append(torch_pin)
        find_links = _find_links_dirs()
    recipe = {"requirements": [f"mlx[cpu]=={mlx}", *requirements, "tokenizers"], "overrides": overrides,
              "find_links": find_links, "packaging": _packaging_digest(), "python": sys.version.split()[0]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    final = os.path.join(CONFORMANCE_VENVS, name)
    python = os.path.join(final, "bin", "python")
    marker = os.path.join(final, ".complete")
    if os.path.exists(marker) and open(marker).read().strip() == digest:
        return python
    os.makedirs(CONFORMANCE_VENVS, exist_ok=True)
    # Built in place (a venv hard-codes its path in its scripts); the marker, written
    # last, says it is complete. One build at a time: the harness runs its jobs in turn.
    shutil.rmtree(final, ignore_errors=True)
    subprocess.run([uv(), "venv", "-q", "-p", sys.executable, final], check=True)
    command = [uv(), "pip", "install", "-q", "-p", python, *recipe["requirements"], "-e", ROOT]
    for directory in find_links:
        command += ["--find-links", directory]
    if overrides:
        listing = os.path.join(final, "overrides.txt")
        with open(listing, "w") as out:
            out.write("\n".join(overrides) + "\n")
        command += ["--override", listing]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise CannotInstall(" ".join(lines[-4:])[:600] or f"uv exited with {done.returncode}")
    with open(os.path.join(final, "recipe.json"), "w") as out:
        json.dump(recipe, out, indent=1)
    with open(marker, "w") as out:
        out.write(digest)
    return python


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
