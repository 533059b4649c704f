"""Virtual environments holding one mlx-lm / mlx-vlm release each, next to mlx for the CPU.

Old releases are pure-python wheels, so `uv` makes each environment in seconds from
its cache. They live in `.venvs/` at the repository root (ignored by git) and are
reused across runs; building one is safe when several processes race for it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.path.join(ROOT, ".venvs")
NEWEST_MLX = "0.32.4"


class CannotInstall(RuntimeError):
    """The release cannot be installed next to this mlx (resolver or build failure)."""


def _packaging_digest() -> str:
    # The package is installed editable, so code changes show at once; a change to how it
    # is packaged (entry points, the start-up .pth) needs a fresh venv.
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py"):
        with open(os.path.join(ROOT, name), "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:8]


def release_python(requirement: str, mlx: str = NEWEST_MLX, extra: Sequence[str] = ("mlx-lm",)) -> str:
    """The interpreter of a venv with `requirement` (e.g. 'mlx-lm==0.31.1'), mlx[cpu]==`mlx` and this package.

    `extra` requirements are resolved together with it (mlx-lm by default, which a pin
    of mlx-lm simply satisfies). Raises CannotInstall with the resolver's reason.
    """
    name = requirement.replace("==", "-").replace("<", "-lt-").replace("[", "").replace("]", "")
    name = f"{name}-mlx{mlx}-{_packaging_digest()}"
    if set(extra) - {"mlx-lm"}:  # pins (releases.toml [pins]) make a venv of their own
        name += "-pins-" + hashlib.sha256(" ".join(sorted(extra)).encode()).hexdigest()[:6]
    final = os.path.join(VENVS, name)
    python = os.path.join(final, "bin", "python")
    if os.path.exists(os.path.join(final, ".complete")):
        return python
    os.makedirs(VENVS, exist_ok=True)
    uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=VENVS)
    try:
        subprocess.run([uv, "venv", "-q", "-p", sys.executable, scratch], check=True)
        done = subprocess.run([uv, "pip", "install", "-q", "-p", os.path.join(scratch, "bin", "python"),
                               f"mlx[cpu]=={mlx}", *extra, requirement, "tokenizers", "-e", ROOT],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            raise CannotInstall(" ".join(lines[-3:])[:400] or f"uv exited with {done.returncode}")
        open(os.path.join(scratch, ".complete"), "w").close()
        # venvs hard-code their own path: build under a scratch name, then rename only
        # if nothing needs the path yet; the loser of a race keeps using the winner's.
        try:
            os.rename(scratch, final)
        except OSError:
            if not os.path.exists(os.path.join(final, ".complete")):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return python
