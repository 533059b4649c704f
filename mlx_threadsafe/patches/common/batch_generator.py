"""A BatchGenerator's owner thread, and its close guard (mlx-lm's and mlx-vlm's alike).

Once stepped on a thread, a BatchGenerator's batch state is lazy work bound to that thread, and
two threads driving it at once corrupt it. Owner: built on a Worker, that worker owns it; built
elsewhere, its builder does and calls from there stay direct. It moves to a dedicated Worker
only when another thread calls it before its builder stepped it or after its builder ended;
otherwise that call raises WrongThread. Arrays handed to a call that hops are evaluated on the
caller first. Close guard: ``close()``/``__del__`` never raise when the garbage collector runs
them on a foreign thread (mlx-lm #1888).
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import weakref
from types import ModuleType
from typing import Any, Optional, Sequence

import wrapt

from ... import diagnostics, streams, versions
from ...errors import TargetMissing, WorkerClosed, WrongThread, is_thread_error
from ...materialize import materialize
from ...patching.homes import find_class
from ...registry import Patch
from ...worker import Worker, current_worker

log = logging.getLogger("mlx_threadsafe")
OWNER = "_mlx_threadsafe_owner"
_generator_names = itertools.count()


# Calls that only queue work (python lists); every other call may leave lazy state on
# the calling thread's stream.
_QUEUING_METHODS = frozenset({"insert", "insert_segments"})


class Owner:
    """Who runs a generator's calls.

    A generator built on a Worker belongs to that worker. One built on any other
    thread belongs to that thread, and its calls from there run directly, exactly as
    without the shim. It moves to a dedicated Worker only where a call from another
    thread would otherwise fail: while its builder has not stepped it yet (nothing of
    it is lazy on the builder's stream), or once the builder has ended (it evaluated
    the generator's state on its way out). A generator pinned to its builder's own
    concrete stream never moves: that stream cannot be used anywhere else.
    """

    __slots__ = ("thread", "worker", "dedicated", "pinned", "stepped", "handed_over", "lock")

    def __init__(self, thread: threading.Thread, worker: Optional[Worker], dedicated: bool,
                 pinned: bool = False) -> None:
        self.thread = thread
        self.worker = worker
        self.dedicated = dedicated  # a Worker made for this generator alone, closed with it
        self.pinned = pinned  # runs on its builder's concrete stream
        self.stepped = False  # its builder has made calls that leave lazy state
        self.handed_over = False  # its builder ended and evaluated the generator's state
        self.lock = threading.Lock()

    def is_current(self) -> bool:
        return threading.current_thread() is self.thread


def _effective_stream(instance, kwargs):
    """The stream the generator will run on: its stream=, else its module's generation_stream."""
    stream = kwargs.get("stream")
    if stream is None:
        stream = vars(sys.modules[type(instance).__module__]).get("generation_stream")
    return stream


def _pins_to_builder(stream) -> bool:
    """True when `stream` is a concrete stream and streams are bound to their thread here."""
    import mlx.core as mx

    # An mx.ThreadLocalStream resolves per thread; before thread-bound streams any
    # thread may use any stream.
    return isinstance(stream, mx.Stream) and versions.detect().streams_bound_to_threads


def _construct(wrapped, instance, args, kwargs):
    worker = current_worker()
    if worker is not None:
        vars(instance)[OWNER] = Owner(worker.thread, worker, dedicated=False)
        return wrapped(*args, **kwargs)
    owner = Owner(threading.current_thread(), None, dedicated=False,
                  pinned=_pins_to_builder(_effective_stream(instance, kwargs)))
    vars(instance)[OWNER] = owner
    if not owner.pinned:
        # What the builder hands in stays usable if the generator moves to a Worker.
        _evaluate_array_arguments(args, kwargs)
        _hand_over_when_thread_ends(instance, owner)
    return wrapped(*args, **kwargs)


_built_here = threading.local()


def _hand_over_when_thread_ends(instance, owner: Owner) -> None:
    built = getattr(_built_here, "generators", None)
    if built is None:
        built = _built_here.generators = []
        streams.at_thread_end(lambda: _hand_over(built))  # False (nothing to do) on the main thread
    # Weak references (a generator need not be hashable); the collected ones are dropped here,
    # so a thread that builds a generator per request does not grow the list.
    built[:] = [(ref, known) for ref, known in built if ref() is not None]
    built.append((weakref.ref(instance), owner))


def _hand_over(built: list) -> None:
    # Runs on the builder as it ends, while its stream still exists: evaluate the lazy
    # state of each generator it still owns, so that a Worker can carry on with it.
    for ref, owner in list(built):
        instance = ref()
        if instance is None:
            continue
        with owner.lock:
            if owner.worker is None:
                materialize(instance)
                owner.handed_over = True
                log.debug("%s: state evaluated as thread %s ended", type(instance).__name__, owner.thread.name)


def _evaluate_array_arguments(args, kwargs) -> None:
    """Evaluate, on the calling thread, the arrays an owner-bound call is handed.

    Arrays the caller built lazily (mlx-vlm's ``insert(prompt_kwargs=[{"inputs_embeds":
    ...}])``) belong to the caller's stream; evaluated, any thread may read them. Only
    containers are searched, not objects: a model or processor argument was loaded
    (and materialized) already, and walking a tokenizer's vocabulary costs time.
    """
    materialize((args, kwargs), into_objects=False)


def _on_owner(wrapped, instance, args, kwargs):
    try:
        return _call_on_owner(wrapped, instance, args, kwargs)
    except RuntimeError as error:
        diagnostics.explain(error)  # a note naming the threads; the error itself is re-raised as it is
        raise


def _call_on_owner(wrapped, instance, args, kwargs):
    owner: Optional[Owner] = vars(instance).get(OWNER) if instance is not None else None
    if owner is None:
        return wrapped(*args, **kwargs)  # made before install()
    if owner.worker is None and owner.is_current():
        if not owner.stepped:
            _first_calls_on_builder(owner, wrapped, args, kwargs)
        if owner.worker is None:
            return wrapped(*args, **kwargs)
    if owner.worker is None:
        _move_to_worker(owner, instance)
    if owner.worker.owns_current_thread():
        return wrapped(*args, **kwargs)
    _evaluate_array_arguments(args, kwargs)
    return owner.worker.call(wrapped, *args, **kwargs)


def _first_calls_on_builder(owner: Owner, wrapped, args, kwargs) -> None:
    with owner.lock:
        if owner.worker is not None:
            return  # another thread moved it to a Worker meanwhile
        if getattr(wrapped, "__name__", "") in _QUEUING_METHODS:
            _evaluate_array_arguments(args, kwargs)
        else:
            owner.stepped = True


def _move_to_worker(owner: Owner, instance) -> None:
    with owner.lock:
        if owner.worker is not None:
            return
        builder = owner.thread.name
        caller = threading.current_thread().name
        if owner.pinned:
            raise WrongThread(
                f"this {type(instance).__name__} belongs to thread {builder!r} (it was built there on that "
                f"thread's own stream) and was called from thread {caller!r}. Call it from its own thread, "
                "or build it without a concrete stream= (mx.new_thread_local_stream() works anywhere) so "
                "that mlx_threadsafe can move it to an owner Worker that every thread can call."
            )
        if owner.stepped and not owner.handed_over:
            raise WrongThread(
                f"this {type(instance).__name__} was stepped on thread {builder!r}, which is still running, "
                f"and was then called from thread {caller!r}: its state is lazy work of {builder!r}'s stream, "
                "which no other thread can evaluate. Keep every call on one thread, or build it on a "
                "mlx_threadsafe.Worker (worker.call(BatchGenerator, ...)) and any thread may call it."
            )
        worker = Worker(f"{type(instance).__name__}-{next(_generator_names)}")
        owner.thread, owner.worker, owner.dedicated = worker.thread, worker, True
        log.debug("%s built on %s moved to worker %s for a call from %s",
                  type(instance).__name__, builder, worker.name, caller)


def _close_on_owner(wrapped, instance, args, kwargs):
    owner: Optional[Owner] = vars(instance).get(OWNER)
    if owner is None or owner.worker is None or owner.is_current():
        result = wrapped(*args, **kwargs)
    else:
        try:
            result = owner.worker.call(wrapped, *args, **kwargs)
        except WorkerClosed:
            result = wrapped(*args, **kwargs)  # the owner is gone; the close guard covers the sync
    if owner is not None and owner.dedicated:
        owner.worker.close(wait=False)
    return result


def _delete_on_owner(wrapped, instance, args, kwargs):
    # The collector may run this on any thread, holding any lock: never wait here.
    owner: Optional[Owner] = vars(instance).get(OWNER)
    if owner is None or owner.worker is None or owner.is_current() or owner.worker.closed:
        wrapped(*args, **kwargs)
        if owner is not None and owner.dedicated:
            owner.worker.close(wait=False)
    elif owner.dedicated:
        owner.worker.close(wait=False, teardown=lambda: wrapped(*args, **kwargs))
    else:
        owner.worker.submit(wrapped, *args, **kwargs)


class _BatchGeneratorPatch(Patch):
    """A patch of the BatchGenerator class a release keeps in the first of `homes` that has one."""

    def __init__(self, *, package: str, homes: Sequence[str], what: str = "", **fields) -> None:
        super().__init__(package=package, trigger=package.replace("-", "_"), target=f"{homes[0]}.BatchGenerator{what}",
                         **fields)
        self.homes = list(homes)

    def batch_generator_class(self) -> Any:
        return find_class(self.homes, "BatchGenerator")


class BatchGeneratorOwnerPatch(_BatchGeneratorPatch):
    """Every method of the BatchGenerator class runs on the generator's owner."""

    def _apply(self, module: ModuleType) -> None:
        cls = self.batch_generator_class()
        self.originals.set_attribute(cls, "__init__", wrapt.FunctionWrapper(cls.__init__, _construct))
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or not callable(value) or name in ("close", "stats"):
                continue
            self.originals.set_attribute(cls, name, wrapt.FunctionWrapper(value, _on_owner))
        if "close" in vars(cls):
            self.originals.set_attribute(cls, "close", wrapt.FunctionWrapper(cls.close, _close_on_owner))
        if "__del__" in vars(cls):
            self.originals.set_attribute(cls, "__del__", wrapt.FunctionWrapper(cls.__del__, _delete_on_owner))


def _swallow_foreign_stream(wrapped, instance, args, kwargs):
    try:
        return wrapped(*args, **kwargs)
    except RuntimeError as error:
        if not is_thread_error(error):
            raise
        # The stream's thread is gone or is another thread: there is nothing left to
        # synchronize from here, and raising would only print from __del__.
        log.debug("%s.%s: ignored %s", type(instance).__name__, getattr(wrapped, "__name__", "close"), error)
        _restore_wired_limit(instance)
        return None


def _restore_wired_limit(generator) -> None:
    # mlx-lm's close() restores the limit right after the sync that raised.
    old_limit = getattr(generator, "_old_wired_limit", None)
    if old_limit is not None:
        import mlx.core as mx

        mx.set_wired_limit(old_limit)
        generator._old_wired_limit = None


def _never_raise(wrapped, instance, args, kwargs):
    try:
        wrapped(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - __del__ must not raise
        log.debug("%s.__del__: ignored %r", type(instance).__name__, error)


class _StreamsToSynchronize(list):
    """The streams a ``wired_limit`` synchronizes as it exits, seen from the exiting thread.

    mlx-vlm's BatchGenerator (0.5.0+) enters ``wired_limit`` in ``__init__`` and exits
    it in ``close()``/``__del__``, possibly on another thread; there, on Metal,
    ``mx.synchronize`` of the entering thread's stream raises and the wired limit is
    never restored. Iterated on another thread this list is empty: the sync is skipped
    (that thread cannot wait for another thread's stream) and the limit is restored.
    """

    def __init__(self, streams) -> None:
        super().__init__(streams)
        self.entered_on = threading.get_ident()

    def __iter__(self):
        if threading.get_ident() != self.entered_on:
            log.debug("wired_limit exits off the thread that entered it: stream sync skipped")
            return iter(())
        return super().__iter__()


def _sync_only_on_entering_thread(wrapped, instance, args, kwargs):
    if len(args) > 1 and args[1] is not None:
        args = (args[0], _StreamsToSynchronize(args[1])) + tuple(args[2:])
    elif kwargs.get("streams") is not None:
        kwargs = dict(kwargs, streams=_StreamsToSynchronize(kwargs["streams"]))
    return wrapped(*args, **kwargs)


class CloseGuardPatch(_BatchGeneratorPatch):
    """close()/__del__ of the BatchGenerator class never raise off their thread."""

    def __init__(self, **fields) -> None:
        super().__init__(what=".close", description="close() and __del__ never raise off their thread", **fields)

    def _apply(self, module: ModuleType) -> None:
        cls = self.batch_generator_class()
        if "close" not in vars(cls):
            raise TargetMissing(f"{cls.__module__}.BatchGenerator has no close()")
        self.originals.set_attribute(cls, "close", wrapt.FunctionWrapper(cls.close, _swallow_foreign_stream))
        if "__del__" in vars(cls):
            self.originals.set_attribute(cls, "__del__", wrapt.FunctionWrapper(cls.__del__, _never_raise))
        # The wired_limit the generator's own module calls (mlx-lm 0.29+ sets the limit
        # by hand instead and has none to guard there).
        home = sys.modules[cls.__module__]
        wired_limit = vars(home).get("wired_limit")
        if callable(wired_limit) and "_wire_stack" in cls.__init__.__code__.co_names:
            self.originals.set_attribute(home, "wired_limit",
                                         wrapt.FunctionWrapper(wired_limit, _sync_only_on_entering_thread))
