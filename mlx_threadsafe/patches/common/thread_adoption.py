"""Adopt a thread into the shim the first time it evaluates MLX work.

Both mlx.thread_cleanup and mlx.thread_rng need threads adopted; they share one
wrapper layer on ``mx.eval``. Adoption is once per thread, so the layer sits on calls
that happen once per request or per thread, never on one that happens once per token:
``mx.async_eval`` (one call per generated token in mlx-lm and mlx-vlm) is left as MLX
made it. A thread is adopted by whichever comes first: its first ``mx.eval`` (mlx-lm's
``generate_step`` makes one at its first token, ``BatchGenerator.next`` at every step),
its first random draw or seed (mlx.thread_rng), its first ``mx.new_stream`` or
shim-made generation stream, or its first call into a Worker or a BatchGenerator.
Every thread started while the layer is on is also waited for at exit once it ended (a
hook where ``threading.Thread`` starts), even if none of its MLX calls passes the layer.

The same layer explains MLX's thread errors that pass through ``mx.eval`` (at no cost
to a call that does not fail) and those that end a thread or the program unhandled
(``threading.excepthook`` / ``sys.excepthook``, which catch ``async_eval``, ``item()``
and the rest); records which thread made each ``mx.new_stream``; and arms the fork guard.
"""

import sys
import threading
from typing import Any, Dict, Tuple

import wrapt

from ... import diagnostics, stream_owners
from ...patching.homes import module_attribute
from ...patching.originals import Originals
from ...registry import Patch
from ...streams import _local, adopt_current_thread, watch_thread_end

_originals = Originals()
_users: set = set()

# Collectives issued and not yet evaluated: group key -> (thread ident, thread name,
# collective). Kept here because this layer sees every mx.eval (mlx.distributed.one_thread).
pending_collectives: Dict[Any, Tuple[int, str, str]] = {}
_collectives_lock = threading.Lock()


def adopt_then_call(wrapped, instance, args, kwargs):
    if not getattr(_local, "adopted", False):
        adopt_current_thread()
    try:
        return wrapped(*args, **kwargs)
    except RuntimeError as error:
        diagnostics.explain(error)  # a note naming the threads; the error itself is re-raised as it is
        raise


def _record_new_stream(wrapped, instance, args, kwargs):
    stream = wrapped(*args, **kwargs)  # first: adoption may make the thread's default stream
    stream_owners.record(stream)
    if not getattr(_local, "adopted", False):
        adopt_current_thread()
    return stream


def adopt_then_eval(wrapped, instance, args, kwargs):
    result = adopt_then_call(wrapped, instance, args, kwargs)
    if pending_collectives:  # the one check the single-thread path pays
        settle_collectives_of_this_thread()
    return result


def settle_collectives_of_this_thread() -> None:
    """The calling thread's mx.eval returned: every collective it issued has run."""
    me = threading.get_ident()
    with _collectives_lock:
        for key in [key for key, holder in pending_collectives.items() if holder[0] == me]:
            del pending_collectives[key]


def _watch_end_from_start(wrapped, instance, args, kwargs):
    # On the new thread, before any of its code, and before threading knows it as the
    # current thread (so the name comes from the Thread object). No MLX call here.
    watch_thread_end(instance.name)
    return wrapped(*args, **kwargs)


def _explain_then_report(wrapped, instance, args, kwargs):
    # threading.excepthook(args) / sys.excepthook(type, value, traceback): the note goes
    # on before the report prints, on the thread error however it escaped.
    diagnostics.explain(args[0].exc_value if len(args) == 1 else args[1])
    return wrapped(*args, **kwargs)


def require(mlx_core, user: str) -> None:
    """Put the layer on for `user` (a patch id); the first user puts it on."""
    if not _users:
        for name, wrapper in (("eval", adopt_then_eval), ("new_stream", _record_new_stream)):
            _originals.set_attribute(mlx_core, name, wrapt.FunctionWrapper(module_attribute("mlx.core", name), wrapper))
        for owner in (threading, sys):
            _originals.set_attribute(owner, "excepthook", wrapt.FunctionWrapper(owner.excepthook, _explain_then_report))
        # Every thread started from now on is waited for at exit once it ended, even one whose
        # MLX calls the layer never sees (mlx-lm <= 0.25's generate_step: only async_eval
        # and item() for a short prompt). _bootstrap_inner is where every threading.Thread
        # starts (CPython 3.8-3.14).
        if hasattr(threading.Thread, "_bootstrap_inner"):
            _originals.set_attribute(threading.Thread, "_bootstrap_inner", wrapt.FunctionWrapper(
                threading.Thread._bootstrap_inner, _watch_end_from_start))
        diagnostics.watch_forks()
    _users.add(user)


def replacements():
    """What the shared layer replaced (mx.eval, mx.new_stream, the excepthooks), while it is on."""
    return list(_originals.records)


def release(user: str) -> None:
    """The last user to leave takes the layer off, restoring the very same originals."""
    _users.discard(user)
    if not _users:
        _originals.restore()


class AdoptionLayerPatch(Patch):
    """A patch that needs threads adopted: the shared layer is on while any such patch is applied."""

    def replacements(self):
        return super().replacements() + replacements()

    def _apply(self, mlx_core) -> None:
        require(mlx_core, self.id)
        self.originals.on_restore(lambda: release(self.id))
        self._apply_with_layer(mlx_core)

    def _apply_with_layer(self, mlx_core) -> None:
        raise NotImplementedError
