"""mlx.thread_cleanup: every thread that used MLX releases its streams on itself as it ends.

After a Python thread is joined its OS thread still runs the C++ ``thread_local``
destructors; MLX's per-thread compile cache releases Python objects there, and if the
main thread is already finalizing the interpreter the process aborts with
``terminate called without an active exception``. ``mx.clear_streams()`` at the end
of the thread (what the MLX maintainers do in mlx-lm's own tests) prevents it.

How: ``mx.eval`` and ``mx.async_eval`` adopt the calling thread (one thread-local
lookup per call); an adopted thread runs ``mx.clear_streams()`` on itself when it
ends (see `mlx_threadsafe.streams`), and is recorded so that at exit the main thread
waits for its OS thread to finish its C++ destructors (the package's exit hook, in
`mlx_threadsafe.worker`, which stays on after revert: threads that ended while the
patch was on may still be waiting for the GIL).
"""

from .. import streams
from ..originals import Originals
from ..registry import Patch
from . import thread_adoption

_originals = Originals()


def apply(mlx_core):
    thread_adoption.require(mlx_core, "mlx.thread_cleanup")
    _originals.on_restore(lambda: thread_adoption.release("mlx.thread_cleanup"))
    streams.cleanup_enabled = True
    _originals.on_restore(lambda: setattr(streams, "cleanup_enabled", False))


def revert():
    _originals.restore()


# The compile cache is per thread from 0.31.2 on every backend, streams bound or not.
PATCH = Patch("mlx.thread_cleanup", "mlx", "mlx.core", apply, revert, needs_thread_bound_streams=False)
