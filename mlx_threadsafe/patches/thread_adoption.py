"""Adopt a thread into the shim the first time it evaluates MLX work."""

import wrapt

from ..streams import _local, adopt_current_thread


def _adopt_then_call(wrapped, instance, args, kwargs):
    if getattr(_local, "end", None) is None:
        adopt_current_thread()
    return wrapped(*args, **kwargs)


def adopting(function):
    return wrapt.FunctionWrapper(function, _adopt_then_call)
