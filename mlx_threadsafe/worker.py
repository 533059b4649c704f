"""Worker: one OS thread that owns MLX state, and a queue of work for it.

The thread creates its stream on itself; the queue is bounded and fails fast when full; waiting can
time out; close() cancels the backlog (callers get WorkerClosed instead of hanging)
but lets the operation in flight finish, then releases the thread's MLX resources
on the thread itself. At exit an operation still in flight after a second is
interrupted (ExitInterrupt, at its next Python line), so that no worker is inside MLX
while the interpreter finalizes.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, Callable, List, Optional

from . import diagnostics, exit_steps, streams
from .errors import MlxThreadsafeWarning, WorkerClosed, WorkerQueueFull
from .materialize import hand_over

log = logging.getLogger("mlx_threadsafe")

DEFAULT_QUEUE_LIMIT = 8192
_names = itertools.count()
_STOP = object()
# How long the exit waits for the operations in flight before interrupting them, then for them to stop.
EXIT_GRACE_S, EXIT_STOP_S = 1.0, 10.0


class ExitInterrupt(BaseException):
    """Raised at exit inside a Worker's operation still in flight, so that it leaves MLX before finalization.

    A BaseException, like KeyboardInterrupt: code under ``except Exception`` does not
    swallow it. Its caller gets WorkerClosed.
    """


def _describe(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class _Core:
    """The state shared by a Worker and its thread.

    The thread holds only this, never the Worker, so an unreferenced Worker can be
    collected and its finalizer can stop the thread.
    """

    def __init__(self, name: str, queue_limit: int, device: Any) -> None:
        self.name = name
        self.device = device
        # SimpleQueue (C) keeps the hop as cheap as ThreadPoolExecutor's; the bound is
        # kept by two counters with one writer each (submitters under `lock`, the thread).
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.queue_limit = queue_limit
        self.submitted = 0
        self.taken = 0
        self.lock = threading.Lock()
        self.closed = False
        self.forked = False  # this is a forked child's copy: its thread did not come along
        self.started = threading.Event()
        self.stream: Any = None
        self.start_error: Optional[BaseException] = None
        self.teardown: List[Callable[[], Any]] = []
        self.thread: Optional[threading.Thread] = None
        self.in_flight: Optional[Callable] = None  # the operation running now (read by interrupt_at_exit)

    def run(self) -> None:
        try:
            self.stream = _own_stream(self.device)
        except BaseException as error:  # noqa: BLE001 - reported to the constructor
            self.start_error = error
        self.started.set()
        while True:
            try:
                if not self._run_next():
                    break
            except ExitInterrupt:
                pass  # interrupt_at_exit() landed between two operations: carry on to _STOP
        for step in self.teardown:
            try:
                step()
            except Exception:  # noqa: BLE001
                log.exception("teardown step on worker %s failed", self.name)
        self.teardown.clear()
        streams.release_thread_streams(self.name)

    def _run_next(self) -> bool:
        """Take one item and run it; False at _STOP."""
        item = self.queue.get()
        if item is _STOP:
            return False
        self.taken += 1
        future, fn, args, kwargs = item
        if not future.set_running_or_notify_cancel():
            return True
        self.in_flight = fn
        try:
            # Evaluated here, on the thread that owns its lazy work: the caller is
            # another thread, which could not evaluate it.
            result = hand_over(fn(*args, **kwargs))
        except ExitInterrupt:
            future.set_exception(WorkerClosed(
                f"worker {self.name!r} was interrupted while running {_describe(fn)}: the process is exiting"))
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            future.set_exception(diagnostics.explain(error))
        else:
            future.set_result(result)
        finally:
            self.in_flight = None
        return True

    def interrupt_at_exit(self) -> bool:
        """Raise ExitInterrupt in the thread's operation in flight, at its next Python line; True if sent.

        For the exit only: the operation (a generation of thousands of tokens, a loop that
        steps a batch) would otherwise still be running MLX while the interpreter
        finalizes, and a thread that comes back from MLX then is ended inside C++ frames
        (`terminate called without an active exception`, exit -6).
        """
        thread = self.thread
        if self.in_flight is None or thread is None or thread.ident is None or not thread.is_alive():
            return False
        import ctypes

        sent = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(ExitInterrupt))
        log.debug("worker %s: its operation in flight interrupted at exit", self.name)
        return sent == 1

    def submit(self, fn: Callable, args, kwargs) -> Future:
        future: Future = Future()
        with self.lock:
            if self.forked:
                raise diagnostics.fork_error(f"worker {self.name!r} cannot run {_describe(fn)}")
            if self.closed:
                raise WorkerClosed(f"worker {self.name!r} is closed; cannot run {_describe(fn)}")
            if self.submitted - self.taken >= self.queue_limit:
                raise WorkerQueueFull(
                    f"worker {self.name!r} has {self.queue_limit} operations queued (queue_limit); "
                    f"refusing {_describe(fn)}"
                )
            self.submitted += 1
            self.queue.put((future, fn, args, kwargs))
        return future

    def stop(self, teardown: Optional[Callable[[], Any]] = None) -> bool:
        """Cancel the backlog and tell the thread to finish; True if this call closed it."""
        with self.lock:
            if teardown is not None and not self.closed:
                self.teardown.append(teardown)
            if self.closed:
                if teardown is not None:
                    # the thread may already be past its teardown steps: say so, never drop it silently
                    warnings.warn(f"worker {self.name!r} was already closed; teardown "
                                  f"{_describe(teardown)} was not run", MlxThreadsafeWarning, stacklevel=4)
                return False
            self.closed = True
            cancelled = 0
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    continue
                future, fn = item[0], item[1]
                if future.set_running_or_notify_cancel():
                    future.set_exception(WorkerClosed(f"worker {self.name!r} closed before running {_describe(fn)}"))
                    cancelled += 1
            self.queue.put(_STOP)
        log.debug("worker %s closing; %d queued operations cancelled", self.name, cancelled)
        return True


def _own_stream(device: Any) -> Any:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return None
    return streams.generation_stream(device)


class Worker:
    """A dedicated thread that owns MLX state; send it work with submit() or call().

    >>> worker = Worker("model-a")
    >>> model, tokenizer = worker.call(mlx_lm.load, path)
    >>> text = worker.call(mlx_lm.generate, model, tokenizer, "hello")
    >>> worker.close()
    """

    def __init__(
        self,
        name: Optional[str] = None,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        await_timeout: Optional[float] = None,
        device: Any = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        if await_timeout is not None and await_timeout <= 0:
            raise ValueError(f"await_timeout must be positive or None, got {await_timeout}")
        self.await_timeout = await_timeout
        self._core = _Core(name or f"mlx-worker-{next(_names)}", queue_limit, device)
        thread = threading.Thread(target=self._core.run, name=self._core.name, daemon=True)
        self._core.thread = thread
        thread.start()
        self._core.started.wait()
        if self._core.start_error is not None:
            self._core.stop()
            raise self._core.start_error
        # Stop the thread when the Worker is collected without close().
        self._finalizer = weakref.finalize(self, self._core.stop)
        _running_cores.add(self._core)
        _workers_by_thread[thread.ident] = self  # type: ignore[index]  # started: ident is set

    # -- monitoring ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def queue_depth(self) -> int:
        core = self._core
        return 0 if core.closed else max(0, core.submitted - core.taken)

    @property
    def is_alive(self) -> bool:
        thread = self._core.thread
        return thread is not None and thread.is_alive() and not self._core.closed

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def thread(self) -> threading.Thread:
        return self._core.thread  # type: ignore[return-value]

    @property
    def stream(self) -> Any:
        """The stream this worker created on its own thread (None without mlx)."""
        return self._core.stream

    def owns_current_thread(self) -> bool:
        # get_ident() is cheaper than current_thread(), and call() asks on every hop
        return threading.get_ident() == self._core.thread.ident  # type: ignore[union-attr]

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"queue_depth={self.queue_depth}"
        return f"<Worker {self.name!r} {state}>"

    # -- work ------------------------------------------------------------

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)` on the worker; returns a Future of its result.

        Raises WorkerClosed after close() and WorkerQueueFull when the queue is at
        its limit: back-pressure is reported at once, never by blocking.
        """
        return self._core.submit(fn, args, kwargs)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the worker and return its result, re-raising its exception.

        From the worker's own thread the call runs inline, so work that calls back
        into its owner does not deadlock.
        """
        if self.owns_current_thread():
            return fn(*args, **kwargs)
        future = self._core.submit(fn, args, kwargs)
        try:
            return future.result(self.await_timeout)
        except concurrent.futures.TimeoutError:
            if not future.done():
                future.cancel()
                raise TimeoutError(
                    f"timed out after {self.await_timeout}s waiting for worker {self.name!r} "
                    f"to run {_describe(fn)} (queue_depth={self.queue_depth})"
                ) from None
            raise

    async def acall(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """The awaitable form of call(), for asyncio code."""
        import asyncio  # here, not at the top: only asyncio code pays for importing it

        if self.owns_current_thread():
            return fn(*args, **kwargs)
        future = asyncio.wrap_future(self.submit(fn, *args, **kwargs))
        if self.await_timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, self.await_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"timed out after {self.await_timeout}s waiting for worker {self.name!r} to run {_describe(fn)}"
            ) from None

    # -- lifecycle -------------------------------------------------------

    def close(self, *, wait: bool = True, timeout: Optional[float] = None,
              teardown: Optional[Callable[[], Any]] = None) -> None:
        """Stop the worker. Idempotent, and safe to call from the worker itself.

        Queued operations are cancelled (their callers get WorkerClosed); the one in
        flight finishes; `teardown`, if given, then runs on the worker thread, which
        releases its streams and exits. With wait=True this returns once it has.
        """
        self._core.stop(teardown)
        self._finalizer.detach()
        if wait and not self.owns_current_thread():
            self._core.thread.join(timeout)  # type: ignore[union-attr]

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# Every worker thread still running; closed at interpreter exit (below).
_running_cores: "weakref.WeakSet[_Core]" = weakref.WeakSet()


def _stop_workers() -> None:
    # Worker threads are daemons, so they would still be alive while the interpreter
    # finalizes, and their C++ thread-locals would then be destroyed mid-finalization
    # (the `terminate called without an active exception` abort). Stop them first, so
    # each releases its streams on itself and exits.
    # An operation still in flight after a short grace (Ctrl-C or SIGTERM during a long
    # generation) is interrupted at its next Python line: the thread then cancels, tears
    # down and exits like any other.
    cores = list(_running_cores)
    for core in cores:
        core.stop()
    cores = [core for core in cores if core.thread is not None and core.thread is not threading.current_thread()]
    deadline = time.monotonic() + EXIT_GRACE_S
    for core in cores:
        core.thread.join(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
    for core in cores:
        core.interrupt_at_exit()
    deadline = time.monotonic() + EXIT_STOP_S
    for core in cores:
        core.thread.join(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        if core.thread.is_alive():  # type: ignore[union-attr]
            log.debug("worker %s still running at exit (an operation inside MLX)", core.name)


exit_steps.add(exit_steps.STOP_WORKERS, _stop_workers)
# join() returns before OS threads have run MLX's C++ destructors: wait for these and for
# every other MLX thread that ended (mlx.thread_cleanup records them).
exit_steps.add(exit_steps.WAIT_FOR_THREADS, streams.wait_for_ended_threads)


def _workers_stay_with_the_parent() -> None:
    # In a forked child no worker thread exists: refuse work at once instead of queueing
    # it for a thread that will never take it (the caller would wait forever).
    for core in list(_running_cores):
        core.forked = True
        core.closed = True
        core.lock = threading.Lock()  # the parent's lock may have been held at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_workers_stay_with_the_parent)


# Thread ident -> every live Worker, to find the worker that owns the calling thread.
_workers_by_thread: "weakref.WeakValueDictionary[int, Worker]" = weakref.WeakValueDictionary()


def current_worker() -> Optional[Worker]:
    """The Worker whose thread is calling, if any."""
    worker = _workers_by_thread.get(threading.get_ident())
    if worker is not None and worker.owns_current_thread():
        return worker
    return None
