"""Adopt a thread into the shim the first time it evaluates MLX work.

Both mlx.thread_cleanup and mlx.thread_rng need threads adopted; they share one
wrapper layer on ``mx.eval`` / ``mx.async_eval`` (each layer costs about a microsecond
per call, and generation calls them for every token). The same layer explains MLX's
thread errors that pass through it (at no cost to a call that does not fail), records
which thread made each ``mx.new_stream``, and arms the fork guard.
"""

import wrapt

from ... import diagnostics
from ...patching.homes import module_attribute
from ...patching.originals import Originals
from ...streams import _local, adopt_current_thread

_originals = Originals()
_users: set = set()


def adopt_then_call(wrapped, instance, args, kwargs):
    if getattr(_local, "end", None) is None:
        adopt_current_thread()
    try:
        return wrapped(*args, **kwargs)
    except RuntimeError as error:
        diagnostics.explain(error)  # a note naming the threads; the error itself is re-raised as it is
        raise


def _record_new_stream(wrapped, instance, args, kwargs):
    stream = wrapped(*args, **kwargs)
    diagnostics.record_stream(stream)
    return stream


def require(mlx_core, user: str) -> None:
    """Wrap eval/async_eval for `user` (a patch id); the first user puts the layer on."""
    if not _users:
        for name in ("eval", "async_eval"):
            _originals.set_attribute(mlx_core, name,
                                     wrapt.FunctionWrapper(module_attribute("mlx.core", name), adopt_then_call))
        _originals.set_attribute(mlx_core, "new_stream",
                                 wrapt.FunctionWrapper(module_attribute("mlx.core", "new_stream"), _record_new_stream))
        diagnostics.watch_forks()
    _users.add(user)


def replacements():
    """What the shared layer replaced (mx.eval, mx.async_eval), while it is on."""
    return list(_originals.records)


def release(user: str) -> None:
    """The last user to leave takes the layer off, restoring the very same originals."""
    _users.discard(user)
    if not _users:
        _originals.restore()
