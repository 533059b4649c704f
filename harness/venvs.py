"""Virtual environments made with `uv`, each holding some requirements and this package, editable.

A venv is named by its recipe (the requirements, the uv overrides and find-links folders,
the Python version and the digest of how this package is packaged), so a changed recipe
makes a new venv and an unchanged one is reused. They live under `.venvs/` at the
repository root (ignored by git). Each is built in a scratch folder beside its final
place and renamed there once complete (uv's relocatable venvs: scripts find their
interpreter by relative path), so a venv that exists is whole, and processes racing to
build the same one each get a working one: the loser of the rename uses the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.path.join(ROOT, ".venvs")
# What decides how this package installs: a change to either needs fresh venvs (code
# changes show at once through the editable install).
PACKAGING_FILES = ("pyproject.toml", os.path.join("mlx_threadsafe", "bootstrap", "mlx_threadsafe-autoinstall.pth"))
COMPLETE = ".complete"  # written last in the scratch folder: the venv is whole

__all__ = ["ROOT", "VENVS", "CannotInstall", "uv", "packaging_digest", "venv_python"]


class CannotInstall(RuntimeError):
    """The requirements cannot be installed together here (resolver or build failure), or uv is missing."""


def uv() -> str:
    """The uv executable: on PATH, or beside this interpreter (`pip install uv` in a venv)."""
    found = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    if not os.path.exists(found):
        raise CannotInstall("uv is not installed (pip install uv)")
    return found


def packaging_digest() -> str:
    """The digest of PACKAGING_FILES: pyproject.toml and the start-up .pth the wheel carries."""
    digest = hashlib.sha256()
    for name in PACKAGING_FILES:
        with open(os.path.join(ROOT, name), "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:8]


def venv_python(label: str, requirements: Sequence[str], overrides: Sequence[str] = (),
                find_links: Sequence[str] = (), where: str = VENVS) -> str:
    """The interpreter of `where/<label>-<recipe digest>`, built first if missing.

    `requirements` are resolved together with this package (editable); `overrides` are uv
    override lines (`pkg; sys_platform == 'never'` drops pkg); `find_links` are folders of
    local wheels. Raises CannotInstall with the resolver's last lines.
    """
    recipe = {"requirements": list(requirements), "overrides": list(overrides), "find_links": list(find_links),
              "packaging": packaging_digest(), "python": sys.version.split()[0]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{label}-{digest}"
    final = os.path.join(where, name)
    python = os.path.join(final, "bin", "python")
    if os.path.exists(os.path.join(final, COMPLETE)):
        return python
    os.makedirs(where, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=where)
    try:
        subprocess.run([uv(), "venv", "-q", "--relocatable", "-p", sys.executable, scratch],
                       check=True)
        command = [uv(), "pip", "install", "-q", "-p", os.path.join(scratch, "bin", "python"), *requirements,
                   "-e", ROOT]
        for directory in find_links:
            command += ["--find-links", directory]
        if overrides:
            listing = os.path.join(scratch, "overrides.txt")
            with open(listing, "w") as out:
                out.write("\n".join(overrides) + "\n")
            command += ["--override", listing]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            raise CannotInstall(" ".join(lines[-4:])[:600] or f"uv exited with {done.returncode}")
        with open(os.path.join(scratch, "recipe.json"), "w") as out:
            json.dump(dict(recipe, label=label), out, indent=1)
        open(os.path.join(scratch, COMPLETE), "w").close()
        try:
            os.rename(scratch, final)
        except OSError:  # another process renamed its build there first: use that one
            if not os.path.exists(os.path.join(final, COMPLETE)):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return python
