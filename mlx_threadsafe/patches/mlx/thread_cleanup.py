"""mlx.thread_cleanup: every thread that used MLX releases its streams on itself as it ends.

After a Python thread is joined its OS thread still runs the C++ ``thread_local``
destructors; MLX's per-thread compile cache releases Python objects there, and if the
main thread is already finalizing the interpreter the process aborts with
``terminate called without an active exception``. ``mx.clear_streams()`` at the end
of the thread (what the MLX maintainers do in mlx-lm's own tests) prevents it.

How: a thread is adopted once, at its first ``mx.eval`` (one thread-local lookup per
call; ``mx.async_eval``, called per token, is left alone), draw, stream or Worker call
(see `..common.thread_adoption`); an adopted thread runs ``mx.clear_streams()`` on itself when it
ends (see `mlx_threadsafe.streams`). Every thread started while the patch is on, adopted
or not (one whose MLX work is only ``async_eval`` and ``item()``), is recorded as it ends,
so that at exit the main thread waits for its OS thread to finish its C++ destructors (the package's exit hook, in
`mlx_threadsafe.worker`, which stays on after revert: threads that ended while the
patch was on may still be waiting for the GIL).
"""

from ..common.thread_adoption import AdoptionLayerPatch, Use


class ThreadCleanupPatch(AdoptionLayerPatch):
    use = Use(cleanup=True)


# The compile cache is per thread from 0.31.2 on every backend, streams bound or not.
PATCH = ThreadCleanupPatch(id="mlx.thread_cleanup", package="mlx", trigger="mlx.core", target="mlx.core.eval",
                           description="a thread that used MLX releases its streams as it ends")
