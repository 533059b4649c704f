"""Every exception and warning mlx_threadsafe raises or emits, and the MLX error it explains."""

from __future__ import annotations

# The tail of MLX's error when a thread uses a stream, or evaluates lazy work, of
# another thread: "There is no Stream(gpu, 3) in current thread."
THREAD_ERROR_TEXT = "in current thread"


def is_thread_error(error: BaseException) -> bool:
    """Whether `error` is MLX's "There is no Stream(...) in current thread"."""
    return isinstance(error, RuntimeError) and THREAD_ERROR_TEXT in str(error)


class MlxThreadsafeWarning(UserWarning):
    """Something the shim could not do; filter it like any other warning category."""


class TargetMissing(Exception):
    """Raised by a patch's apply when the release does not have what the patch rewrites.

    The patch is reported `skipped` with this message: the library moved on, the
    host program is fine.
    """


class WrongThread(RuntimeError):
    """An object that belongs to one thread was called from another, where the shim cannot help."""


class LazyModelUsedOffThread(RuntimeError):
    """A model loaded with lazy=True was run on a thread other than the one that loaded it."""


class WorkerClosed(RuntimeError):
    """The worker was closed: queued work was cancelled, new work is refused."""


class WorkerQueueFull(RuntimeError):
    """The worker's queue is at its limit: back-pressure, try again later."""


class ForkedAfterMlxUse(RuntimeError):
    """MLX was called in a child forked after its parent used MLX (it would hang)."""


class ConcurrentCollectives(RuntimeError):
    """A thread issued an mx.distributed collective while another thread of the rank had one pending."""
