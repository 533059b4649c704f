"""mlx.cuda_capture_gate: no thread creates or tears down its CUDA state while another captures.

On CUDA, MLX records cuBLAS matmuls into its graphs by stream capture while it encodes a
graph. A device-wide call made meanwhile by another thread (the cuBLAS handle a thread
makes at its first matmul, the streams and handles it destroys as it ends) invalidates
the capture, and MLX aborts (``cudaStreamEndCapture ... failed``). The gate lets encoding
run on any number of threads at once and keeps those calls apart from it:

- ``mx.eval`` / ``mx.async_eval`` encode inside the gate, shared (``mx.eval`` then waits
  for its results outside it, so no thread holds the gate while it waits on the GPU);
- a thread's first evaluation is exclusive, after a small matmul that makes its handles;
- a thread's end is exclusive: it releases its streams, and no one encodes again until
  its OS thread, with its C++ ``thread_local`` destructors, is gone;
- ``mx.clear_cache`` (which frees device memory) is exclusive.

On by default on CUDA (evidence: an H200, mlx-cuda-13 0.32.4); ``MLX_THREADSAFE_DISABLE=
mlx.cuda_capture_gate`` turns it off.
"""

import threading
from threading import get_ident
from types import ModuleType
from typing import Any, Callable

import wrapt

from ... import streams
from ...patching.per_token import per_token_wrapper
from ..common.thread_adoption import AdoptionLayerPatch, Use


class Gate:
    """A reader/writer gate whose exclusive side outlasts the thread that took it (until its OS thread ends).

    The shared side is taken on every evaluation, by many threads at once, so it takes no
    lock: a holder puts itself in `_holders`, then reads `_closed`; an exclusive taker sets
    `_closed`, then reads `_holders`. Each dict or attribute operation is atomic (the GIL,
    or the per-object locks of a free-threaded build) and they run in program order, so
    either the holder sees the gate closed and backs off, or the taker sees the holder and
    waits for it. Everything else happens under `_lock`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._holders: dict = {}  # thread ident -> True, for each thread inside the shared side
        self._closed = False  # an exclusive holder or waiter, or an ending thread: shared entries wait
        self._exclusive = False
        self._waiting_exclusive = 0
        self._ending: set = set()  # native ids of ended threads whose OS thread may still run destructors

    def run_shared(self, call: Callable[..., Any], args: tuple) -> Any:
        """`call(*args)` inside the shared side; a thread already inside (its evaluation re-entered
        from Python code it ran) just calls. Once per token: kept to a few dict operations."""
        me = get_ident()
        holders = self._holders
        if me in holders:
            return call(*args)
        holders[me] = True
        if self._closed:
            self._wait_open(me)
        try:
            return call(*args)
        finally:
            del holders[me]
            if self._closed:  # a taker may be waiting for the holders to leave
                with self._lock:
                    self._condition.notify_all()

    def _wait_open(self, me: int) -> None:
        del self._holders[me]
        with self._lock:
            self._condition.notify_all()  # a taker may have seen this thread registered
            while True:
                while self._exclusive or self._waiting_exclusive or (self._ending and self._still_ending()):
                    self._condition.wait(0.0005 if self._ending else None)
                self._update_closed()
                self._holders[me] = True
                if not self._closed:  # still open once registered (a taker may have come meanwhile)
                    return
                del self._holders[me]

    def enter_exclusive(self) -> None:
        with self._lock:
            self._waiting_exclusive += 1
            self._closed = True
            while self._exclusive or self._holders or (self._ending and self._still_ending()):
                self._condition.wait(0.0005 if self._ending else 0.01)
            self._waiting_exclusive -= 1
            self._exclusive = True

    def leave_exclusive(self, ending_native_id: "int | None" = None) -> None:
        with self._lock:
            if ending_native_id is not None and streams.sees_os_threads():
                self._ending.add(ending_native_id)
            self._exclusive = False
            self._update_closed()
            self._condition.notify_all()

    def _update_closed(self) -> None:
        self._closed = bool(self._exclusive or self._waiting_exclusive or self._ending)

    def _still_ending(self) -> bool:
        self._ending = {tid for tid in self._ending if streams.os_thread_alive(tid)}
        self._ending.discard(threading.get_native_id())  # a thread never waits for its own end
        if not self._ending:
            self._update_closed()
        return bool(self._ending)


_gate = Gate()
_local = threading.local()  # .seen: the thread made its first use
_original_async_eval: Any = None  # mx.async_eval as MLX made it, while the patch is on


def _release_exclusively(release) -> None:
    # On the ending thread, after its own end steps (which may still evaluate).
    _gate.enter_exclusive()
    try:
        release()
    finally:
        _gate.leave_exclusive(threading.get_native_id())


def _first_use() -> None:
    import mlx.core as mx

    _local.seen = True
    streams.adopt_current_thread()  # so that its end releases its streams (through the gate)
    _gate.enter_exclusive()
    try:
        warm = mx.ones((16, 16))
        _original_async_eval(warm @ warm)  # the thread's cuBLAS handles, made while no one captures
    finally:
        _gate.leave_exclusive()


def _encode(args: tuple) -> None:
    if not getattr(_local, "seen", False):
        _first_use()
    return _gate.run_shared(_original_async_eval, args)


def _gated_async_eval(wrapped, instance, args, kwargs):
    return _encode(args)


def _exclusive(wrapped, instance, args, kwargs):
    _gate.enter_exclusive()
    try:
        return wrapped(*args, **kwargs)
    finally:
        _gate.leave_exclusive()


class CudaCaptureGatePatch(AdoptionLayerPatch):
    # mx.eval encodes inside the gate (the layer's before_eval), then waits for its results outside it.
    use = Use(cleanup=True, before_eval=_encode, around_release=_release_exclusively)

    def _apply_with_layer(self, mlx_core: ModuleType) -> None:
        global _original_async_eval
        _original_async_eval = mlx_core.async_eval
        # Once per generated token: a per-token wrapper, not wrapt's FunctionWrapper (per_token.py says why).
        self.originals.set_attribute(mlx_core, "async_eval", per_token_wrapper(mlx_core.async_eval,
                                                                               _gated_async_eval))
        if hasattr(mlx_core, "clear_cache"):
            self.originals.set_attribute(mlx_core, "clear_cache", wrapt.FunctionWrapper(mlx_core.clear_cache,
                                                                                        _exclusive))


# Evidence: mlx-cuda-13 0.32.4 on an H200 (benchmarks/cuda_capture/RESULTS.md).
PATCH = CudaCaptureGatePatch(id="mlx.cuda_capture_gate", package="mlx", trigger="mlx.core",
                             target="mlx.core.async_eval",
                             description="CUDA encoding shared, a thread's first use and end exclusive",
                             backends=["cuda"])
