"""materialize(obj): evaluate every array reachable from a model, on the calling thread.

A lazy array belongs to the stream of the thread that built it, so a model with lazy state
cannot be used from another thread. ``mlx_lm.load()`` evaluates only ``model.parameters()``,
which leaves out ``_``-prefixed attributes (``rope._freqs``), arrays in tuples and plain
objects, and LoRA adapters.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # `import mlx_threadsafe` loads this module: no typing (or types) at start-up
    from typing import Any, List


def _function() -> None:
    pass


# types.ModuleType, FunctionType, BuiltinFunctionType and MethodType, without importing types.
_LEAF_TYPES = (str, bytes, int, float, complex, bool, type(None), type(sys), type,
               type(_function), type(len), type(_function.__get__(0)))


def reachable_arrays(obj: "Any", into_objects: bool = True) -> "List[Any]":
    """Every distinct ``mx.array`` reachable from `obj`.

    Walks module children and attributes (``_`` keys included: an ``nn.Module`` is a
    dict of its children and parameters plus a plain ``__dict__``), lists, tuples,
    sets, dicts and, unless `into_objects` is false, plain objects' ``__dict__``; each
    object is visited once.
    """
    import mlx.core as mx

    found: List[Any] = []
    seen = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _LEAF_TYPES):
            continue
        seen.add(id(item))
        if isinstance(item, mx.array):
            found.append(item)
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        namespace = getattr(item, "__dict__", None) if into_objects else None
        if isinstance(namespace, dict):
            stack.extend(namespace.values())
    return found


def hand_over(value: "Any") -> "Any":
    """Evaluate what `value` holds before it is handed to another thread; returns `value`.

    A lazy array belongs to the stream of the thread that built it, so a result
    computed on one thread (a Worker, a generator's owner) and returned lazy fails on
    the receiving thread with ``There is no Stream``. Evaluated, any thread may read it.
    Walks containers and plain objects (responses, caches, dataclasses). A value that
    cannot be evaluated here (arrays of yet another thread) is handed over as it is.
    """
    if "mlx.core" not in sys.modules or isinstance(value, _LEAF_TYPES):
        return value  # nothing to evaluate: a process without MLX, or a plain value
    try:
        materialize(value)
    except RuntimeError as error:
        import logging

        logging.getLogger("mlx_threadsafe").debug("result handed over lazy: %s", error)
    return value


def materialize(obj: "Any", into_objects: bool = True) -> int:
    """Evaluate, in one ``mx.eval`` on the calling thread, every array reachable from `obj`.

    Returns how many distinct arrays were evaluated (arrays already evaluated are
    counted and cost nothing). `into_objects` as for `reachable_arrays`.
    """
    import mlx.core as mx

    arrays = reachable_arrays(obj, into_objects)
    if arrays:
        mx.eval(arrays)
    return len(arrays)
