"""Wrappers for module functions that mlx-lm calls once per token (``mx.async_eval``, ``mx.stream``).

wrapt's ``FunctionWrapper`` dispatches each call through its descriptor machinery: about 1.4 us
a call on top of the wrapper's own code (wrapt 2.5.2, CPython 3.11, this project's CPU
machine), which a tiny model on a GPU, at 0.4 ms a token, feels. A module-level function needs
none of that binding, so `per_token_wrapper` makes a ``wrapt.ObjectProxy`` with its own
``__call__`` (about 0.4 us): as transparent as a ``FunctionWrapper`` (name, signature,
``__wrapped__``, ``==`` and hashing of the original), and called with the same
``(wrapped, instance, args, kwargs)`` convention, ``instance`` always None.
"""

from __future__ import annotations

from typing import Any, Callable

import wrapt


class PerTokenWrapper(wrapt.ObjectProxy):
    """The proxies `per_token_wrapper` makes are of this type (a subclass per wrapper)."""


def per_token_wrapper(wrapped: Callable[..., Any], wrapper: Callable[..., Any]) -> PerTokenWrapper:
    """``wrapper(wrapped, None, args, kwargs)`` in place of ``wrapped(*args, **kwargs)``; module functions only."""

    # The two callables are closure cells: attribute lookups on a proxy cost about 0.2 us each.
    class _Wrapper(PerTokenWrapper):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return wrapper(wrapped, None, args, kwargs)

    _Wrapper.__name__ = _Wrapper.__qualname__ = f"PerTokenWrapper[{getattr(wrapper, '__name__', 'wrapper')}]"
    return _Wrapper(wrapped)
