"""mlx.thread_cleanup: every thread that used MLX releases its streams on itself as it ends.

A thread's C++ ``thread_local`` destructors run after ``join()`` returns; run while the main
thread finalizes the interpreter they abort the process (``terminate called without an active
exception``). Adopted threads (`..common.thread_adoption`) run ``mx.clear_streams()`` as they end,
and the exit hook (`mlx_threadsafe.exit_steps`) waits for the OS thread of every thread started
while the patch is on, adopted or not; that wait stays after revert, for threads that ended before.
"""

from ..common.thread_adoption import AdoptionLayerPatch, Use


class ThreadCleanupPatch(AdoptionLayerPatch):
    use = Use(cleanup=True)


# The compile cache is per thread from 0.31.2 on every backend, streams bound or not.
PATCH = ThreadCleanupPatch(id="mlx.thread_cleanup", package="mlx", trigger="mlx.core", target="mlx.core.eval",
                           description="a thread that used MLX releases its streams as it ends")
