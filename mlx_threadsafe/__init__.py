"""mlx_threadsafe: makes mlx-lm and mlx-vlm safe to use from threads, by patching.

    import mlx_threadsafe
    mlx_threadsafe.install()

Importing the package changes nothing; install() applies the patches that the
compat matrix names for the installed releases (now, or when their module is first
imported), and uninstall() puts every original object back.

An install() made before mlx, mlx_lm or mlx_vlm is imported costs almost nothing: it
plans just before the first of them is imported (or when its status is first read),
which is where the matrix, wrapt and the patches are loaded.
"""

import sys
from _thread import RLock

# A function of the same name as its module: bound here, or the submodule, once imported,
# would shadow it as the package attribute.
from .materialize import materialize

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported on first use (below): `import mlx_threadsafe` stays cheap, typing included
    from typing import Any, Iterable, Optional

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
    from .patch_status import PatchStatus, State, Status
    from .registry import Registry
    from .streams import generation_stream, seed
    from .worker import Worker

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "install", "install_later", "uninstall", "status", "is_installed", "Status", "PatchStatus", "State",
    "Worker", "WorkerClosed", "WorkerQueueFull", "WrongThread", "LazyModelUsedOffThread", "TargetMissing",
    "ForkedAfterMlxUse", "ConcurrentCollectives",
    "materialize", "generation_stream", "seed", "MlxThreadsafeWarning", "__version__",
]

# Public names whose modules load on first use, and where they live.
_LAZY = {
    "Worker": "worker", "generation_stream": "streams", "seed": "streams",
    "Status": "patch_status", "PatchStatus": "patch_status", "State": "patch_status",
    **dict.fromkeys(("ConcurrentCollectives", "ForkedAfterMlxUse", "LazyModelUsedOffThread", "MlxThreadsafeWarning",
                     "TargetMissing", "WorkerClosed", "WorkerQueueFull", "WrongThread"), "errors"),
}

# The import of one of these plans an install() that was made before it.
TRIGGERS = ("mlx", "mlx_lm", "mlx_vlm")

_registry: "Optional[Registry]" = None
_deferred: "Any" = None  # the import watcher of an install() waiting for the first MLX import
_lock = RLock()  # a thread-end or import hook may re-enter while the registry is made


def __getattr__(name: str) -> "Any":
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get_registry() -> "Registry":
    global _registry
    with _lock:
        if _registry is not None:
            return _registry
        # The one exit hook (exit_steps) is registered by the worker module, before any patch applies.
        from . import worker  # noqa: F401
        from .patches import CATALOGUE
        from .registry import Registry

        _registry = Registry(CATALOGUE)  # each patch's module imported once planning leaves it on
    return _registry


def install(*, only: "Optional[Iterable[str]]" = None, exclude: "Optional[Iterable[str]]" = None,
            batch: "Optional[bool]" = None) -> "Status":
    """Apply the patches this environment needs; idempotent. Returns the status table.

    `only` / `exclude` take patch ids; MLX_THREADSAFE_DISABLE=id1,id2 (or *) disables
    patches from the environment. Made before any of mlx, mlx_lm, mlx_vlm is imported
    (and without `only` / `exclude`, which are checked at once), it plans just before
    the first of them is imported; the Status it returns plans when first read.
    `batch=True` turns the batch mode on (concurrent stream_generate calls on one model
    join one BatchGenerator: mlx_threadsafe.batching), False off; None leaves it as it
    is (off unless MLX_THREADSAFE_BATCH=1).
    """
    if batch is not None:
        from . import batching

        batching.set_enabled(batch)
    if only is None and exclude is None and install_later():
        from .patch_status import Status

        return Status.planned_on_read(status)
    return install_now(only=only, exclude=exclude)


def install_later() -> bool:
    """Install at the first import of mlx, mlx_lm or mlx_vlm; False (nothing done) if one is imported already.

    What the start-up hook calls: it builds no Status, so a process that never imports
    MLX loads nothing beyond the package and the standard-library import watcher.
    """
    if _registry is not None or any(name in sys.modules for name in TRIGGERS):
        return False
    _defer_planning()
    return True


def install_now(*, only: "Optional[Iterable[str]]" = None,
                exclude: "Optional[Iterable[str]]" = None) -> "Status":
    """install(), planned now whatever is imported (the start-up hook, from inside the first MLX import)."""
    _cancel_deferred()
    return _get_registry().install(only=only, exclude=exclude)


def _defer_planning() -> None:
    global _deferred
    if _deferred is not None:
        return
    from . import import_watch

    def plan_before_first_mlx_import(name: str) -> None:
        # Before any of its code runs: every target is then patched as it completes.
        if name.partition(".")[0] in TRIGGERS:
            try:
                install_now()
            except Exception as error:  # noqa: BLE001 - never fail the application's import
                sys.stderr.write(f"mlx_threadsafe: not installed: {type(error).__name__}: {error}\n")

    _deferred = plan_before_first_mlx_import
    import_watch.watch_before(_deferred)


def _cancel_deferred() -> None:
    """Stop waiting for the first MLX import (if an install() was waiting)."""
    global _deferred
    with _lock:
        waiting, _deferred = _deferred, None
    if waiting is not None:
        from . import import_watch

        import_watch.unwatch(waiting)


def uninstall() -> "Status":
    """Revert every applied patch (the original objects come back) and cancel pending ones."""
    _cancel_deferred()
    return _get_registry().uninstall()


def status() -> "Status":
    if _deferred is not None:
        return install_now()
    return _get_registry().status()


def is_installed() -> bool:
    return _deferred is not None or (_registry is not None and _registry.is_installed())
