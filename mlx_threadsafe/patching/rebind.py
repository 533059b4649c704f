"""Replace objects everywhere a release bound them: module globals and default arguments.

Upstream hands one object out in several ways: the defining module's global,
``from … import name`` copies in other modules (``mlx_lm.load`` is a copy of
``mlx_lm.utils.load``; ``mlx_lm.server`` copies ``generation_stream`` in 0.30.6-0.31.2),
and default arguments bound at ``def`` time (``stream=generation_stream`` in 0.32.x).
wrapt's ``wrap_function_wrapper`` rewrites one attribute; this finds every holder
through ``gc.get_referrers`` and records each change in an `Originals`.
"""

import gc
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    return rebind_everywhere_many([(original, replacement)], originals)[0]


def rebind_everywhere_many(pairs: Sequence[Tuple[Any, Any]], originals: Originals) -> List[List[str]]:
    """`rebind_everywhere` for several ``(original, replacement)`` pairs, in one pass over the heap.

    ``gc.get_referrers`` walks every tracked object whatever it looks for: one call for all
    the originals costs what a call for one does. Each original is listed once; a holder
    of several is repointed for all of them at once. Returns, per pair, the holders that
    could not be repointed (the pairs themselves and frames are not holders; any other
    container of the caller's that holds an original is).
    """
    pairs = list(pairs)
    targets = tuple(original for original, _ in pairs)
    replacing = {id(original): replacement for original, replacement in pairs}
    index = {id(original): i for i, original in enumerate(targets)}
    ours = {id(targets), *map(id, pairs)}  # the pairs themselves hold the originals
    holders = [r for r in gc.get_referrers(*targets) if id(r) not in ours and not _is_a(r, types.FrameType)]
    holder_ids = set(map(id, holders))
    modules_by_dict = {id(vars(m)): m for m in list(sys.modules.values()) if _is_a(m, types.ModuleType)}
    unreachable: List[List[str]] = [[] for _ in pairs]
    for holder in holders:
        held = {id(value): replacing[id(value)] for value in gc.get_referents(holder) if id(value) in replacing}
        if _is_a(holder, dict) and id(holder) in modules_by_dict:
            module = modules_by_dict[id(holder)]
            for name, value in list(holder.items()):
                if id(value) in held:
                    originals.set_attribute(module, name, held[id(value)])
            # gc does not track a defaults tuple that holds only untracked objects (an
            # mx.Stream), so get_referrers misses it: look at the module's functions.
            for function in _functions_of(module):
                defaults, kwdefaults = function.__defaults__, function.__kwdefaults__
                if defaults is not None and id(defaults) not in holder_ids:
                    _repoint_defaults(defaults, held, originals, function)
                if kwdefaults is not None and id(kwdefaults) not in holder_ids:
                    _repoint_kwdefaults(kwdefaults, held, originals, function)
        elif _is_a(holder, tuple) and _repoint_defaults(holder, held, originals):
            continue
        elif _is_a(holder, dict) and _repoint_kwdefaults(holder, held, originals):
            continue
        elif _is_internal(holder):
            continue
        else:
            description = _describe(holder)
            for key in held:
                unreachable[index[key]].append(description)
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


def _repoint_defaults(defaults: tuple, replacing: Dict[int, Any], originals: Originals,
                      function: Optional[Any] = None) -> bool:
    # `replacing`: the replacement of each original, by the original's id.
    if not any(id(value) in replacing for value in defaults):
        return False
    functions = [function] if function is not None else [
        f for f in _functions_holding(defaults) if f.__defaults__ is defaults]
    for function in functions:
        originals.set_defaults(function, defaults=tuple(replacing.get(id(v), v) for v in defaults))
    return bool(functions)


def _repoint_kwdefaults(kwdefaults: dict, replacing: Dict[int, Any], originals: Originals,
                        function: Optional[Any] = None) -> bool:
    if not any(id(value) in replacing for value in kwdefaults.values()):
        return False
    functions = [function] if function is not None else [
        f for f in _functions_holding(kwdefaults) if f.__kwdefaults__ is kwdefaults]
    for function in functions:
        repointed = {k: replacing.get(id(v), v) for k, v in kwdefaults.items()}
        originals.set_defaults(function, kwdefaults=repointed)
    return bool(functions)


def _is_internal(holder: Any) -> bool:
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
