"""Errors that say which thread and what to do; a forked child that refuses MLX instead of hanging.

Which thread made which stream comes from `stream_owners`. When MLX's ``There is no Stream(cpu, 3) in current
thread`` passes through anything the shim wraps, `explain` adds a note (PEP 678) that
names the thread owning that stream, the thread that used it, and the fixes. The
exception's type and message stay as MLX made them.

fork: MLX's CPU build keeps worker threads and locks that a ``fork()``ed child does not
get, so a child forked after the parent evaluated anything hangs at its first
evaluation. After such a fork the child's ``mlx.core`` functions and the
array methods that read values (``item``, ``tolist``, ``__array__``, ...) raise
`ForkedAfterMlxUse` at once. Still uncovered: operators on arrays the parent made
(``a * 2``) build lazy work silently, and numpy's buffer-protocol path
(``np.asarray(a)``) cannot be intercepted from Python.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, List, Tuple

from . import stream_owners
from .errors import ForkedAfterMlxUse, is_thread_error

_NOTED = "_mlx_threadsafe_noted"

FIXES = ("Lazy arrays and streams belong to the thread that made them. Fixes: evaluate on that thread "
         "before handing results over (mx.eval(x), or mlx_threadsafe.materialize(obj) for a model or a "
         "container); or run every call on one owner, a mlx_threadsafe.Worker; or load models with "
         "lazy=False (the default), so nothing of theirs is lazy.")
# A stream passed as stream= to an op is not remapped (that would cost every op a check).
STREAM_ARGUMENT_FIX = ("If the stream was passed as stream= to an op, enter it instead (with mx.stream(s): ...): "
                       "under mlx_threadsafe that gives this thread its own stream on the same device.")


def explain(error: BaseException) -> BaseException:
    """Add a note naming the threads and the fix to MLX's thread error (once); returns `error`."""
    if not is_thread_error(error) or getattr(error, _NOTED, False) or not hasattr(error, "add_note"):
        return error
    key = stream_owners.key_in(str(error))
    owner = stream_owners.owner(key) if key is not None else None
    here = threading.current_thread().name
    stream = f"Stream({key[0]}, {key[1]})" if key is not None else "that stream"
    if owner is None:
        made_by = (f"{stream} was not made on this thread (the shim has no record of its thread: a thread-local "
                   "stream, or one made before install())")
    elif owner.kind == "default":
        made_by = f"{stream} is the default stream of thread {stream_owners.describe(owner)}"
    else:
        made_by = f"{stream} was made by thread {stream_owners.describe(owner)}"
    hint = f" {STREAM_ARGUMENT_FIX}" if owner is not None and owner.kind == "made" else ""
    error.add_note(f"mlx_threadsafe: {made_by}; it was used on thread {here!r}. {FIXES}{hint}")
    try:
        setattr(error, _NOTED, True)
    except AttributeError:
        pass
    return error


# ------------------------------------------------------------------ fork

_mlx_used_in_parent = False
_fork_hook_registered = False
# The array methods that read values; each would hang in a forked child. __repr__ is left
# alone: printing an array in a traceback must not raise a second time.
VALUE_READERS = ("item", "tolist", "__array__", "__float__", "__int__", "__bool__", "__index__")
MLX_SUBMODULES = ("random", "linalg", "fft", "fast", "distributed", "metal", "cuda")


def mark_mlx_used() -> None:
    """Called when a thread first evaluates through the shim: from now on a fork is unsafe."""
    global _mlx_used_in_parent
    _mlx_used_in_parent = True


def watch_forks() -> None:
    """Register the child-side fork hook once (os.register_at_fork has no unregister)."""
    global _fork_hook_registered
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


def _after_fork_in_child() -> None:
    if not _mlx_used_in_parent or "mlx.core" not in sys.modules:
        return
    refuse_mlx_here()


def refuse_mlx_here() -> None:
    """Make every mlx.core function and array value reader raise ForkedAfterMlxUse in this process."""
    mx = sys.modules["mlx.core"]
    namespaces = [mx] + [getattr(mx, name) for name in MLX_SUBMODULES if hasattr(mx, name)]
    for namespace in namespaces:
        for name, value in list(vars(namespace).items()):
            if callable(value) and not isinstance(value, type) and not name.startswith("__"):
                setattr(namespace, name, _refuser(f"{getattr(namespace, '__name__', 'mlx.core')}.{name}"))
    for name in VALUE_READERS:
        try:
            setattr(mx.array, name, _refuser(f"mlx.core.array.{name}"))
        except (AttributeError, TypeError):
            pass


def fork_error(what: str) -> ForkedAfterMlxUse:
    return ForkedAfterMlxUse(
        f"{what}: this process was forked after MLX was used in its parent (pid {os.getppid()}); MLX cannot run "
        "in such a child (it would hang: the parent's MLX threads and locks are not in the child). Start child "
        "processes with the 'spawn' or 'forkserver' method: multiprocessing.get_context('spawn'), "
        "or ProcessPoolExecutor(mp_context=multiprocessing.get_context('spawn')).")


def _refuser(what: str):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise fork_error(what)

    refuse.__name__ = what.rsplit(".", 1)[-1]
    return refuse


# ------------------------------------------------------------------ platform


def protection(environment: Any) -> List[Tuple[str, str]]:
    """What this platform gets from the shim, as (subject, what holds here) rows."""
    streams = ("bound to the thread that made them: the stream patches apply"
               if environment.streams_bound_to_threads else
               "one per process (not bound to threads): the stream patches are skipped")
    if sys.version_info >= (3, 13):
        join = "Thread.join() waits until the OS thread has ended (Python 3.13+): no exit wait is needed"
    else:
        join = ("Thread.join() returns before the thread's C++ thread_local destructors run "
                f"(Python {sys.version_info.major}.{sys.version_info.minor}): the exit wait covers that")
    if os.path.isdir("/proc/self/task"):
        exit_wait = "at exit, waits (at most 1 s) for the OS threads of ended MLX threads (Linux /proc)"
    else:
        exit_wait = ("not available here (no /proc): join threads that used MLX before exiting, "
                     "or a thread still in its C++ destructors may abort the process at exit")
    fork = ("a child forked after MLX was used raises ForkedAfterMlxUse at its first MLX call instead of "
            "hanging; start children with 'spawn' or 'forkserver'" if hasattr(os, "register_at_fork") else
            "no fork on this platform")
    return [(f"streams ({environment.backend}, mlx {environment.mlx or 'not installed'})", streams),
            ("thread end", join), ("exit wait", exit_wait), ("fork", fork)]
