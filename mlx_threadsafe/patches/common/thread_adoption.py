"""Adopt a thread into the shim the first time it evaluates MLX work; the layer patches subscribe to.

Patches declare a `Use` (cleanup, seed, a step before or after each ``mx.eval``) and share one
wrapper layer on ``mx.eval``. A thread is adopted once, by whichever comes first: its first
``mx.eval``, random draw or seed, ``mx.new_stream`` or shim-made stream, or call into a Worker
or a BatchGenerator; ``mx.async_eval`` (once per generated token) is left as MLX made it. Every
thread started while the layer is on is waited for at exit once it ended. The layer also explains
MLX's thread errors (through ``mx.eval``, ``threading.excepthook``, ``sys.excepthook``), records
which thread made each stream, and arms the fork guard.
"""

import sys
import threading
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import wrapt

from ... import diagnostics, stream_owners, streams
from ...patching.homes import module_attribute
from ...patching.originals import Originals
from ...patching.per_token import per_token_wrapper
from ...registry import Patch


class Use(NamedTuple):
    """What a patch needs of the layer."""

    cleanup: bool = False  # adopted threads release their streams as they end; the exit waits for them
    seed: bool = False  # adopted threads get their own random key
    before_eval: Optional[Callable[[tuple], None]] = None  # runs on the thread with each mx.eval's arguments
    after_eval: Optional[Callable[[], None]] = None  # runs on the thread after each of its mx.eval returns
    around_release: Optional[Callable[[Callable[[], None]], None]] = None  # runs an ending thread's release


_originals = Originals()
_uses: Dict[str, Use] = {}
_before_eval: Tuple[Callable[[tuple], None], ...] = ()
_after_eval: Tuple[Callable[[], None], ...] = ()


def adopt_then_call(wrapped, instance, args, kwargs):
    streams.adopt_current_thread()  # once per thread; after that one attribute lookup
    try:
        return wrapped(*args, **kwargs)
    except RuntimeError as error:
        diagnostics.explain(error)  # a note naming the threads; the error itself is re-raised as it is
        raise


def _record_new_stream(wrapped, instance, args, kwargs):
    stream = wrapped(*args, **kwargs)  # first: adoption may make the thread's default stream
    stream_owners.record(stream)
    streams.adopt_current_thread()
    return stream


def adopt_then_eval(wrapped, instance, args, kwargs):
    for step in _before_eval:
        step(args)
    result = adopt_then_call(wrapped, instance, args, kwargs)
    for step in _after_eval:
        step()
    return result


def _watch_end_from_start(wrapped, instance, args, kwargs):
    # On the new thread, before any of its code, and before threading knows it as the
    # current thread (so the name comes from the Thread object). No MLX call here.
    streams.watch_thread_end(instance.name)
    return wrapped(*args, **kwargs)


def _explain_then_report(wrapped, instance, args, kwargs):
    # threading.excepthook(args) / sys.excepthook(type, value, traceback): the note goes
    # on before the report prints, on the thread error however it escaped.
    diagnostics.explain(args[0].exc_value if len(args) == 1 else args[1])
    return wrapped(*args, **kwargs)


def require(mlx_core, user: str, use: Use) -> None:
    """Subscribe `user` (a patch id) to the layer; the first subscriber puts the layer on."""
    if not _uses:
        _put_on(mlx_core)
    _uses[user] = use
    _refresh()


def release(user: str) -> None:
    """Unsubscribe `user`; the last one to leave takes the layer off, restoring the very same originals."""
    _uses.pop(user, None)
    _refresh()
    if not _uses:
        _originals.restore()


def _refresh() -> None:
    global _before_eval, _after_eval
    uses = list(_uses.values())
    streams.configure(cleanup=any(use.cleanup for use in uses), seed=any(use.seed for use in uses),
                      around_release=next((use.around_release for use in uses if use.around_release), None))
    _before_eval = tuple(use.before_eval for use in uses if use.before_eval is not None)
    _after_eval = tuple(use.after_eval for use in uses if use.after_eval is not None)


def _put_on(mlx_core) -> None:
    # mx.eval runs once per token in some releases' generation loops (per_token.py says why not FunctionWrapper).
    _originals.set_attribute(mlx_core, "eval", per_token_wrapper(module_attribute("mlx.core", "eval"), adopt_then_eval))
    _originals.set_attribute(mlx_core, "new_stream", wrapt.FunctionWrapper(module_attribute("mlx.core", "new_stream"),
                                                                           _record_new_stream))
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


def replacements():
    """What the shared layer replaced (mx.eval, mx.new_stream, the excepthooks), while it is on."""
    return list(_originals.records)


class AdoptionLayerPatch(Patch):
    """A patch that needs threads adopted: the layer is on, with this patch's `use`, while it is applied."""

    use = Use()

    def replacements(self):
        return super().replacements() + replacements()

    def _apply(self, mlx_core) -> None:
        require(mlx_core, self.id, self.use)
        self.originals.on_restore(lambda: release(self.id))
        self._apply_with_layer(mlx_core)

    def _apply_with_layer(self, mlx_core) -> None:
        """What the patch does beyond its use of the layer (nothing, by default)."""
