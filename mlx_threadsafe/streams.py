"""Per-thread MLX state: the generation-stream factory, thread-end cleanup, RNG keys.

Every thread gets its own stream and releases its thread-affine resources on itself. A thread
is *adopted* the first time it uses MLX through the shim: a sentinel in a ``threading.local``,
whose ``__del__`` runs ``mx.clear_streams()`` on the thread as CPython clears its state, before
its C++ ``thread_local`` destructors run (mlx-lm PR #1537 does the same by hand). Those
destructors take the GIL and still run after ``Thread.join()`` returns (Python < 3.13), so at
exit the main thread waits (bounded) for the OS threads of ended MLX threads before finalizing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

from . import stream_owners

log = logging.getLogger("mlx_threadsafe")

_local = threading.local()


class _Policy:
    """What adoption does to a thread; set through `configure` by the adoption layer."""

    cleanup = False  # release its streams as it ends, and be waited for at exit
    seed = False  # give it its own random key
    around_release: "Optional[Callable[[Callable[[], None]], None]]" = None  # runs the release of its streams


_policy = _Policy()


def configure(*, cleanup: bool, seed: bool,
              around_release: "Optional[Callable[[Callable[[], None]], None]]" = None) -> None:
    """Whether adopted threads release their streams as they end, and get their own random key.

    `around_release(release)`, if given, is called on the ending thread to run the release
    (after the thread's own end steps), e.g. inside a lock.
    """
    _policy.cleanup, _policy.seed, _policy.around_release = cleanup, seed, around_release

_rng_lock = threading.Lock()
_process_seed: Optional[int] = None
_names_seen: Counter = Counter()
_NAMES_KEPT = 4096


# Native ids of MLX threads whose Python side has ended; their OS threads may still be
# running C++ thread_local destructors (see wait_for_ended_threads).
_ending_native_ids: set = set()
_TASKS = "/proc/self/task"
# A server that starts a thread per request must not grow the set without bound.
_PRUNE_ABOVE = 256


class _ThreadEnd:
    """Lives in the thread's locals; its collection marks the end of the thread."""

    __slots__ = ("thread_name", "owns_streams", "used_mlx", "native_id", "on_end")

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.owns_streams = False
        self.used_mlx = False  # set when the thread is adopted (an MLX call the shim saw)
        self.native_id = threading.get_native_id()
        self.on_end: List[Callable[[], None]] = []

    def __del__(self) -> None:
        # First what must still run on this thread while its streams exist
        # (e.g. a BatchGenerator it owns evaluates its state for the next owner).
        for step in self.on_end:
            try:
                step()
            except Exception:  # noqa: BLE001 - runs while a thread is being torn down
                log.debug("thread-end step %r of thread %s failed", step, self.thread_name, exc_info=True)
        if self.owns_streams or _policy.cleanup:
            # Only a thread seen using MLX calls into it here: one that never did (an HTTP
            # handler thread, watched from its start) has no streams to release, and it is
            # waited for at exit all the same.
            if self.owns_streams or self.used_mlx:
                release_thread_streams(self.thread_name)
            # A Worker's thread owns its streams: it is waited for even without the patch.
            if len(_ending_native_ids) > _PRUNE_ABOVE:
                _ending_native_ids.difference_update([tid for tid in list(_ending_native_ids)
                                                      if not os_thread_alive(tid)])
            _ending_native_ids.add(self.native_id)


def sees_os_threads() -> bool:
    """Whether this platform shows the process's OS threads (Linux ``/proc/self/task``)."""
    return os.path.isdir(_TASKS)


def os_thread_alive(native_id: int) -> bool:
    """Whether the OS thread `native_id` still runs (its C++ destructors too); see `sees_os_threads`."""
    return os.path.exists(f"{_TASKS}/{native_id}")


def wait_for_ended_threads(timeout: float = 1.0) -> None:
    """Wait until the OS threads of ended MLX threads are gone (at most `timeout` s).

    Called by the package's exit hook (`mlx_threadsafe.worker`), after it has stopped
    the workers: atexit handlers run before the interpreter starts finalizing, and
    sleeping releases the GIL their destructors need. Linux only (``/proc/self/task``);
    elsewhere it returns at once.
    """
    if not sees_os_threads():
        return
    deadline = time.monotonic() + timeout
    for native_id in list(_ending_native_ids):
        while os_thread_alive(native_id):
            if time.monotonic() > deadline:
                log.debug("thread %s still running its thread_local destructors at exit", native_id)
                return
            time.sleep(0.0005)
        _ending_native_ids.discard(native_id)


def wait_for_thread(thread: threading.Thread, timeout: float) -> bool:
    """Wait until `thread` has really ended (at most `timeout` s); True if it has.

    Waits on its OS thread where Linux shows it (``/proc/self/task``): after a
    KeyboardInterrupt in ``join()`` (Python < 3.13, bpo-45274) the Thread object says
    stopped while the thread still runs. Elsewhere ``join(timeout)``.
    """
    native_id = getattr(thread, "native_id", None)
    if native_id is None or not sees_os_threads():
        thread.join(timeout)
        return not thread.is_alive()
    deadline = time.monotonic() + timeout
    while os_thread_alive(native_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def release_thread_streams(thread_name: str = "") -> None:
    """Destroy every stream the calling thread created (``mx.clear_streams``).

    Costs one call into MLX per ending thread (microseconds). Streams are
    per thread, so nothing on any other thread can still be using them.
    """
    try:
        import mlx.core as mx

        clear = getattr(mx, "clear_streams", None)
        if clear is not None:
            around = _policy.around_release
            around(clear) if around is not None else clear()
            log.debug("released the streams of thread %s", thread_name or threading.current_thread().name)
    except Exception:  # noqa: BLE001 - runs while a thread is being torn down
        pass


def adopt_current_thread() -> None:
    """Mark the calling thread as an MLX thread: cleanup at its end, its own RNG key.

    Idempotent and cheap after the first call (one attribute lookup).
    """
    if getattr(_local, "adopted", False):
        return
    _local.adopted = True
    thread = threading.current_thread()
    _note_first_use()
    if thread is threading.main_thread():
        _local.end = False  # the main thread ends with the interpreter, not here
        return
    if getattr(_local, "end", None) is None:
        _local.end = _ThreadEnd(thread.name)
    _local.end.used_mlx = True
    if _policy.seed and not getattr(_local, "seeded", False):
        seed_current_thread(thread.name)


def watch_thread_end(thread_name: str) -> None:
    """Called as a thread starts, before any of its own code: the exit waits for it once it ends.

    Calls nothing of MLX (the thread may never use it); adoption proper (the random
    key, the records, ``mx.clear_streams()`` at its end) waits for the thread's first
    MLX call that the shim sees. A thread whose MLX work the shim never sees (only
    ``async_eval`` and ``item()``) is still covered at exit: the main thread waits for
    its OS thread to finish its C++ destructors before finalizing.
    """
    if getattr(_local, "end", None) is None:
        _local.end = _ThreadEnd(thread_name)


def _note_first_use() -> None:
    # Which thread owns its default stream (for the errors that name threads), and
    # that a fork from here on leaves a child that cannot run MLX.
    from . import diagnostics

    diagnostics.mark_mlx_used()
    record_default_stream()


def record_default_stream() -> None:
    """Record the calling thread's default stream (for the errors that name threads)."""
    try:
        import mlx.core as mx

        stream_owners.record(mx.default_stream(mx.default_device()), "default")
    except Exception:  # noqa: BLE001 - records never break the adoption
        pass


def at_thread_end(step: Callable[[], None]) -> bool:
    """Run `step` on the calling thread as it ends, before its streams are released.

    Returns False on the main thread, which ends with the interpreter (nothing is
    registered). Steps run in the order they were added; one that raises is logged.
    """
    adopt_current_thread()
    end = _local.end
    if not end:
        return False
    end.on_end.append(step)
    return True


def generation_stream(device: Any = None) -> Any:
    """The calling thread's own generation stream for `device` (default device if None).

    Created on the calling thread at first use, cached in a ``threading.local`` and
    released on this thread when it ends.
    """
    import mlx.core as mx

    device = mx.default_device() if device is None else device
    streams: Dict[str, Any] = _local.__dict__.setdefault("streams", {})
    key = str(device)
    stream = streams.get(key)
    if stream is None:
        stream = streams[key] = new_owned_stream(device)
    return stream


def has_used_mlx() -> bool:
    """Whether the calling thread has used MLX through the shim (it is adopted)."""
    return getattr(_local, "adopted", False)


def new_owned_stream(device: Any) -> Any:
    """A new stream on the calling thread, released on this thread when it ends."""
    import mlx.core as mx

    adopt_current_thread()
    stream = mx.new_stream(device)
    stream_owners.record(stream)
    end = getattr(_local, "end", None)
    if end:
        end.owns_streams = True
    return stream


# ------------------------------------------------------------------ random keys


def _thread_seed(base: int, thread_name: str, occurrence: int) -> int:
    # crc32 rather than hash(): str hashes are salted per process, which would make
    # seeded runs differ from one run to the next.
    data = f"{base}:{thread_name}:{occurrence}".encode()
    return (zlib.crc32(data) | zlib.crc32(data[::-1]) << 32) & 0xFFFF_FFFF_FFFF


def seed_current_thread(thread_name: str) -> None:
    """Give the calling thread its own key, derived from the process seed and its name."""
    global _process_seed
    with _rng_lock:
        if _process_seed is None:
            _process_seed = int.from_bytes(os.urandom(6), "little")
        if len(_names_seen) >= _NAMES_KEPT:
            # A server that names each request's thread anew must not grow this without
            # bound. Counting starts over: a name seen again now draws what a thread of
            # that name drew before the reset (one long ended, in such a server).
            _names_seen.clear()
        occurrence = _names_seen[thread_name]
        _names_seen[thread_name] += 1
        value = _thread_seed(_process_seed, thread_name, occurrence)
    import mlx.core as mx

    mx.random.seed(value)
    _local.seeded = True


def seed(value: int) -> None:
    """Seed the calling thread with `value`, and every thread's key derivation.

    Threads adopted afterwards get keys derived from `value` and their names, so a
    program that names (or creates) its threads the same way draws the same numbers
    on each thread, run after run.
    """
    global _process_seed
    with _rng_lock:
        _process_seed = int(value)
        _names_seen.clear()
    import mlx.core as mx

    mx.random.seed(int(value))
    _local.seeded = True


def mark_seeded() -> None:
    """The caller seeded this thread itself: never replace its key."""
    _local.seeded = True
