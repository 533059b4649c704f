"""mlx.module_streams: a stream made on one thread works when another thread enters it.

MLX binds each ``mx.Stream`` to the thread that made it. ``mx.stream(s)`` and
``mx.set_default_stream(s)`` given a concrete stream that is not the calling thread's use
that thread's *twin* of it (made once on the same device, released when the thread ends);
``mx.synchronize(s)`` waits for the twin too. Nothing in the program is replaced and ops are
not wrapped (``stream=s`` passed to an op still raises off its thread, with a note). Whose
stream it is: `stream_owners`' record, else one tiny evaluation on it, once per thread and stream.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any, Dict, Optional

from ... import stream_owners, streams
from ...patching.per_token import per_token_wrapper
from ...registry import Patch

_twins = threading.local()  # per thread: stream key -> its twin here (None: the stream is this thread's own)
_Stream: Any = None  # mx.Stream, set when the patch applies (the wrappers run per token in mlx-lm)


def _usable_here(mx: ModuleType, stream: Any) -> bool:
    # A stream made before the shim saw it: try it (one scalar op, evaluated).
    evaluate = getattr(mx.eval, "__wrapped__", mx.eval)
    try:
        evaluate(mx.zeros((), stream=stream))
        return True
    except RuntimeError:
        return False


def twin_of(stream: Any) -> Optional[Any]:
    """The calling thread's twin of `stream`, or None where `stream` works here as it is."""
    if type(stream) is not _Stream:  # a ThreadLocalStream, a Device: MLX resolves those itself
        return None
    key = stream_owners.key_of(stream)
    known: Dict[Any, Any] = _twins.__dict__
    if key is None or key in known:
        return known.get(key)
    here = stream_owners.made_here(key)
    if here is None:
        import mlx.core as mx

        here = _usable_here(mx, stream)
    known[key] = None if here else streams.new_owned_stream(stream.device)
    return known[key]


def _with_twin(wrapped, instance, args, kwargs):
    # mx.stream(s) / mx.set_default_stream(stream): the stream is the first argument.
    if args:
        if type(args[0]) is _Stream:
            twin = twin_of(args[0])
            if twin is not None:
                return wrapped(twin, *args[1:], **kwargs)
    elif kwargs:
        name, stream = next(iter(kwargs.items()))
        twin = twin_of(stream)
        if twin is not None:
            return wrapped(**{**kwargs, name: twin})
    return wrapped(*args, **kwargs)


def _synchronize_twin_too(wrapped, instance, args, kwargs):
    # The thread's work on `s` ran on its twin; what others queued on `s` itself is waited for as before.
    stream = args[0] if args else kwargs.get("stream")
    if type(stream) is _Stream:
        twin = _twins.__dict__.get(stream_owners.key_of(stream))
        if twin is not None:
            wrapped(twin)
    return wrapped(*args, **kwargs)


class StreamRulePatch(Patch):
    def _apply(self, mlx_core: ModuleType) -> None:
        global _Stream
        _Stream = mlx_core.Stream
        # The importing (or installing) thread's default stream: the one lazy arrays made
        # there before any thread was adopted are bound to (for the error notes).
        streams.record_default_stream()
        # mx.stream runs once per token in mlx-lm's generate_step: per_token.py says why not FunctionWrapper.
        for name, wrapper in (("stream", _with_twin), ("set_default_stream", _with_twin),
                              ("synchronize", _synchronize_twin_too)):
            self.originals.set_attribute(mlx_core, name, per_token_wrapper(getattr(mlx_core, name), wrapper))


PATCH = StreamRulePatch(id="mlx.module_streams", package="mlx", trigger="mlx.core", target="mlx.core.stream",
                        description="a stream entered off its thread runs on that thread's twin of it",
                        needs_thread_bound_streams=True)
