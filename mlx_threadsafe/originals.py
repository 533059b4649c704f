"""Remember what a patch replaced, so that revert puts back the very same objects.

wrapt wraps callables but has no unwrap, and it cannot rebind a module global or a
function's ``__defaults__``; every patch records its replacements here instead
(gevent's ``patch_item``/``get_original``, with the restore that gevent lacks).
"""

from __future__ import annotations

from typing import Any, Callable, List

_MISSING = object()


class Originals:
    """A stack of undo steps for one patch; `restore()` unwinds it, newest first."""

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return bool(self._undo)

    def set_attribute(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name`` and return what was there before.

        The original is read from ``owner.__dict__`` when present so that a class
        attribute inherited from a base is removed again, not copied down.
        """
        namespace = getattr(owner, "__dict__", {})
        had_own = name in namespace
        original = namespace[name] if had_own else getattr(owner, name, _MISSING)
        setattr(owner, name, value)

        def undo() -> None:
            if had_own:
                setattr(owner, name, original)
            elif name in getattr(owner, "__dict__", {}):
                delattr(owner, name)

        self._undo.append(undo)
        return None if original is _MISSING else original

    def set_defaults(self, function: Any, defaults: Any = _MISSING, kwdefaults: Any = _MISSING) -> None:
        """Replace a function's ``__defaults__`` and/or ``__kwdefaults__``."""
        old_defaults, old_kwdefaults = function.__defaults__, function.__kwdefaults__
        if defaults is not _MISSING:
            function.__defaults__ = defaults
        if kwdefaults is not _MISSING:
            function.__kwdefaults__ = kwdefaults

        def undo() -> None:
            function.__defaults__ = old_defaults
            function.__kwdefaults__ = old_kwdefaults

        self._undo.append(undo)

    def on_restore(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
