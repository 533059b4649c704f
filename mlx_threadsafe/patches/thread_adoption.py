"""Adopt a thread into the shim the first time it evaluates MLX work.

Both mlx.thread_cleanup and mlx.thread_rng need threads adopted; they share one
wrapper layer on ``mx.eval`` / ``mx.async_eval`` (each layer costs about a microsecond
per call, and generation calls them for every token).
"""

import wrapt

from ..originals import Originals
from ..streams import _local, adopt_current_thread
from .rebind import module_attribute

_originals = Originals()
_users = set()


def adopt_then_call(wrapped, instance, args, kwargs):
    if getattr(_local, "end", None) is None:
        adopt_current_thread()
    return wrapped(*args, **kwargs)


def require(mlx_core, user: str) -> None:
    """Wrap eval/async_eval for `user` (a patch id); the first user puts the layer on."""
    if not _users:
        for name in ("eval", "async_eval"):
            _originals.set_attribute(mlx_core, name,
                                     wrapt.FunctionWrapper(module_attribute("mlx.core", name), adopt_then_call))
    _users.add(user)


def release(user: str) -> None:
    """The last user to leave takes the layer off, restoring the very same originals."""
    _users.discard(user)
    if not _users:
        _originals.restore()
