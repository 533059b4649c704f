"""Remember what a patch replaced, so that revert puts back the very same objects.

wrapt wraps callables but has no unwrap, and it cannot rebind a module global or a
function's ``__defaults__``; every patch records its replacements here instead
(gevent's ``patch_item``/``get_original``, with the restore that gevent lacks). The
records are also what the contract tests check identity against.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

MISSING: Any = object()  # the owner had no attribute of its own by that name


def _own_attribute(owner: Any, name: str) -> Any:
    # From __dict__: getattr on a class would hand back a bound wrapper, not ours.
    namespace = getattr(owner, "__dict__", None)
    return namespace.get(name, MISSING) if namespace is not None else getattr(owner, name, MISSING)


class Replacement:
    """``owner.name`` was `before` (its own, or MISSING) and the patch made it `after`.

    Read-only, compared by value (a plain class: a dataclass costs its start-up to build).
    """

    __slots__ = ("owner", "name", "before", "after")
    owner: Any
    name: str
    before: Any
    after: Any

    def __init__(self, owner: Any, name: str, before: Any, after: Any) -> None:
        for field, value in (("owner", owner), ("name", name), ("before", before), ("after", after)):
            object.__setattr__(self, field, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _fields(self) -> Tuple[Any, ...]:
        return (self.owner, self.name, self.before, self.after)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Replacement(owner={!r}, name={!r}, before={!r}, after={!r})".format(*self._fields())

    def current(self) -> Any:
        """What the owner holds by that name now, as its own (MISSING if nothing)."""
        if self.name in ("__defaults__", "__kwdefaults__"):
            return getattr(self.owner, self.name)
        return _own_attribute(self.owner, self.name)


class Originals:
    """A stack of undo steps for one patch; `restore()` unwinds it, newest first."""

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []
        self.records: List[Replacement] = []

    def __bool__(self) -> bool:
        return bool(self._undo)

    def set_attribute(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name`` and return what was there before.

        The original is read from ``owner.__dict__`` when present so that a class
        attribute inherited from a base is removed again, not copied down.
        """
        namespace = getattr(owner, "__dict__", {})
        had_own = name in namespace
        own = namespace[name] if had_own else MISSING
        original = own if had_own else getattr(owner, name, MISSING)
        setattr(owner, name, value)
        self.records.append(Replacement(owner, name, own, value))

        def undo() -> None:
            # Someone replaced ours after us (a server's own excepthook, another
            # instrumentation's wrapper around ours): theirs stays; putting the original
            # back would silently drop it.
            if _own_attribute(owner, name) is not value:
                return
            if had_own:
                setattr(owner, name, own)
            elif name in getattr(owner, "__dict__", {}):
                delattr(owner, name)

        self._undo.append(undo)
        return None if original is MISSING else original

    def set_defaults(self, function: Any, defaults: Any = MISSING, kwdefaults: Any = MISSING) -> None:
        """Replace a function's ``__defaults__`` and/or ``__kwdefaults__``."""
        old_defaults, old_kwdefaults = function.__defaults__, function.__kwdefaults__
        if defaults is not MISSING:
            function.__defaults__ = defaults
            self.records.append(Replacement(function, "__defaults__", old_defaults, defaults))
        if kwdefaults is not MISSING:
            function.__kwdefaults__ = kwdefaults
            self.records.append(Replacement(function, "__kwdefaults__", old_kwdefaults, kwdefaults))

        def undo() -> None:
            function.__defaults__ = old_defaults
            function.__kwdefaults__ = old_kwdefaults

        self._undo.append(undo)

    def on_restore(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.records.clear()
