"""Replace one object everywhere a release bound it: module globals and default arguments.

Upstream hands one object out in several ways: the defining module's global,
``from … import name`` copies in other modules (``mlx_lm.load`` is a copy of
``mlx_lm.utils.load``; ``mlx_lm.server`` copies ``generation_stream`` in 0.30.6-0.31.2),
and default arguments bound at ``def`` time (``stream=generation_stream`` in 0.32.x).
wrapt's ``wrap_function_wrapper`` rewrites one attribute; this finds every holder
through ``gc.get_referrers`` and records each change in an `Originals`.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any, List

from .originals import Originals


def _is_a(value: Any, kinds: Any) -> bool:
    # isinstance() falls back to reading value.__class__, which runs code in foreign objects
    # (a deprecation shim warns, a lazy proxy imports); the type itself never does.
    return issubclass(type(value), kinds)


def rebind_everywhere(original: Any, replacement: Any, originals: Originals) -> List[str]:
    """Point every module global and default argument bound to `original` at `replacement`.

    Returns a description of each holder that could not be repointed (instances,
    containers, closures): copies that keep the original.
    """
    holders = [r for r in gc.get_referrers(original) if not _is_a(r, types.FrameType)]
    modules_by_dict = {id(vars(m)): m for m in list(sys.modules.values()) if _is_a(m, types.ModuleType)}
    unreachable: List[str] = []
    for holder in holders:
        if _is_a(holder, dict) and id(holder) in modules_by_dict:
            module = modules_by_dict[id(holder)]
            for name, value in list(holder.items()):
                if value is original:
                    originals.set_attribute(module, name, replacement)
            # gc does not track a defaults tuple that holds only untracked objects (an
            # mx.Stream), so get_referrers misses it: look at the module's functions.
            for function in _functions_of(module):
                defaults, kwdefaults = function.__defaults__, function.__kwdefaults__
                if defaults is not None and not any(defaults is h for h in holders):
                    _repoint_defaults(defaults, original, replacement, originals, function)
                if kwdefaults is not None and not any(kwdefaults is h for h in holders):
                    _repoint_kwdefaults(kwdefaults, original, replacement, originals, function)
        elif _is_a(holder, tuple) and _repoint_defaults(holder, original, replacement, originals):
            continue
        elif _is_a(holder, dict) and _repoint_kwdefaults(holder, original, replacement, originals):
            continue
        elif _is_internal(holder, original):
            continue
        else:
            unreachable.append(_describe(holder))
    return unreachable


def _functions_holding(container: Any) -> List[types.FunctionType]:
    return [f for f in gc.get_referrers(container) if _is_a(f, types.FunctionType)]


def _functions_of(module: types.ModuleType) -> List[types.FunctionType]:
    """The functions a module defines: at its top level and in its classes."""
    found = []
    for value in list(vars(module).values()):
        candidates = vars(value).values() if _is_a(value, type) else (value,)
        for candidate in list(candidates):
            if _is_a(candidate, (staticmethod, classmethod)):
                candidate = candidate.__func__
            if _is_a(candidate, types.FunctionType) and candidate.__module__ == module.__name__:
                found.append(candidate)
    return found


def _repoint_defaults(defaults: tuple, original: Any, replacement: Any, originals: Originals,
                      function: Any = None) -> bool:
    if not any(value is original for value in defaults):
        return False
    functions = [function] if function is not None else [
        f for f in _functions_holding(defaults) if f.__defaults__ is defaults]
    for function in functions:
        originals.set_defaults(function, defaults=tuple(replacement if v is original else v for v in defaults))
    return bool(functions)


def _repoint_kwdefaults(kwdefaults: dict, original: Any, replacement: Any, originals: Originals,
                        function: Any = None) -> bool:
    if not any(value is original for value in kwdefaults.values()):
        return False
    functions = [function] if function is not None else [
        f for f in _functions_holding(kwdefaults) if f.__kwdefaults__ is kwdefaults]
    for function in functions:
        repointed = {k: (replacement if v is original else v) for k, v in kwdefaults.items()}
        originals.set_defaults(function, kwdefaults=repointed)
    return bool(functions)


def _is_internal(holder: Any, original: Any) -> bool:
    # A function's own __dict__/__wrapped__ chain, a bound method or a wrapt wrapper of
    # the original are not copies that run the original by themselves.
    if _is_a(holder, types.MethodType) or type(holder).__module__.startswith("wrapt"):
        return True
    return _is_a(holder, types.CellType)


def _own_dict(value: Any) -> Any:
    # Past any __getattribute__ of the object's class (a lazy proxy's runs code).
    try:
        return object.__getattribute__(value, "__dict__")
    except (AttributeError, TypeError):
        return None


def _describe(holder: Any) -> str:
    if _is_a(holder, dict):
        for owner in gc.get_referrers(holder):
            if _own_dict(owner) is holder:
                return f"an attribute of a {type(owner).__module__}.{type(owner).__qualname__}"
        return "a dict"
    return f"a {type(holder).__module__}.{type(holder).__qualname__}"
