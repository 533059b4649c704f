"""Virtual environments holding one mlx-lm / mlx-vlm release each, next to mlx for the CPU.

Old releases are pure-python wheels, so `uv` makes each environment in seconds from
its cache. They are harness.venvs' venvs: in `.venvs/` at the repository root (ignored
by git), named by their recipe, reused across runs, and safe to build when several
processes race for one.
"""

from __future__ import annotations

from typing import Sequence

from harness.venvs import CannotInstall, venv_python

from .releases import NEWEST_MLX

__all__ = ["CannotInstall", "NEWEST_MLX", "release_python"]


def release_python(requirement: str, mlx: str = NEWEST_MLX, extra: Sequence[str] = ("mlx-lm",)) -> str:
    """The interpreter of a venv with `requirement` (e.g. 'mlx-lm==0.31.1'), mlx[cpu]==`mlx` and this package.

    `extra` requirements (mlx-lm by default, which a pin of mlx-lm simply satisfies; the
    pins of releases.toml [pins]) are resolved together with it. Raises CannotInstall
    with the resolver's reason.
    """
    label = requirement.replace("==", "-").replace("<", "-lt-").replace("[", "").replace("]", "")
    return venv_python(f"{label}-mlx{mlx}", [f"mlx[cpu]=={mlx}", *extra, requirement, "tokenizers"])
