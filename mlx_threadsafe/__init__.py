"""mlx_threadsafe: makes mlx-lm and mlx-vlm safe to use from threads, by patching.

    import mlx_threadsafe
    mlx_threadsafe.install()

Importing the package changes nothing; install() applies the patches that the
compat matrix names for the installed releases (now, or when their module is first
imported), and uninstall() puts every original object back.
"""

from __future__ import annotations

from .errors import (
    ConcurrentCollectives,
    ForkedAfterMlxUse,
    LazyModelUsedOffThread,
    MlxThreadsafeWarning,
    TargetMissing,
    WorkerClosed,
    WorkerQueueFull,
    WrongThread,
)

# A function of the same name as its module: bound here, or the submodule, once imported,
# would shadow it as the package attribute.
from .materialize import materialize

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported on first use (below): `import mlx_threadsafe` stays cheap, typing included
    from typing import Any, Iterable, Optional

    from .registry import PatchStatus, Registry, State, Status
    from .streams import generation_stream, seed
    from .worker import Worker

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "install", "uninstall", "status", "is_installed", "Status", "PatchStatus", "State",
    "Worker", "WorkerClosed", "WorkerQueueFull", "WrongThread", "LazyModelUsedOffThread", "TargetMissing",
    "ForkedAfterMlxUse", "ConcurrentCollectives",
    "materialize", "generation_stream", "seed", "MlxThreadsafeWarning", "__version__",
]

# Public names whose modules load on first use, and where they live.
_LAZY = {
    "Worker": "worker", "generation_stream": "streams", "seed": "streams",
    "Status": "registry", "PatchStatus": "registry", "State": "registry",
}

_registry: "Optional[Registry]" = None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get_registry() -> "Registry":
    global _registry
    if _registry is None:
        # The worker module first: its exit hook (stop the workers, then wait for every
        # ended MLX thread) must be registered before any patch's, so that it runs last.
        from . import worker  # noqa: F401
        from .patches import ALL
        from .registry import Registry

        _registry = Registry(ALL)
    return _registry


def install(*, only: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None) -> "Status":
    """Apply the patches this environment needs; idempotent. Returns the status table.

    `only` / `exclude` take patch ids; MLX_THREADSAFE_DISABLE=id1,id2 (or *) disables
    patches from the environment.
    """
    return _get_registry().install(only=only, exclude=exclude)


def uninstall() -> "Status":
    """Revert every applied patch (the original objects come back) and cancel pending ones."""
    return _get_registry().uninstall()


def status() -> "Status":
    return _get_registry().status()


def is_installed() -> bool:
    return _registry is not None and _registry.is_installed()
