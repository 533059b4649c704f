"""mlx.compile.random_state: a compiled sampler draws from the calling thread's random key.

``mx.compile(f, inputs=mx.random.state, outputs=mx.random.state)`` captures the key of the
thread that compiled ``f`` (the main thread, at import); on any other thread it returns the same
draw at every call, and mlx-lm's and mlx-vlm's samplers are compiled that way (mlx-lm #1439,
#1675; fixed inside MLX from 0.32.1, mlx #3828). Such a function is compiled once per calling
thread with that thread's own state (containers around it copied per thread; one that also holds
a plain value is left as it was, with a warning). Sampler modules imported before install() are
imported again and every name-imported copy of their samplers repointed.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Optional

import wrapt

from ... import streams
from ...errors import MlxThreadsafeWarning
from ...patching.originals import Originals
from ...patching.rebind import rebind_everywhere_many
from ...registry import Patch

# Modules that compile samplers with the random state captured at import.
SAMPLER_MODULES = ("mlx_lm.sample_utils", "mlx_vlm.sample_utils")


def _replace(tree: Any, old: Any, new: Any) -> Any:
    """`tree` with `old` (by identity) replaced by `new`; other containers kept as they are."""
    if tree is old:
        return new
    if isinstance(tree, (list, tuple)) and any(_holds(item, old) for item in tree):
        return type(tree)(_replace(item, old, new) for item in tree)
    if isinstance(tree, dict) and any(_holds(item, old) for item in tree.values()):
        return {key: _replace(item, old, new) for key, item in tree.items()}
    return tree


def _holds(tree: Any, state: Any) -> bool:
    if tree is state:
        return True
    if isinstance(tree, (list, tuple)):
        return any(_holds(item, state) for item in tree)
    if isinstance(tree, dict):
        return any(_holds(item, state) for item in tree.values())
    return False


class CompiledPerThread:
    """What ``mx.compile`` returns for a function that captures the random state."""

    def __init__(self, compile_, random, fun, inputs, outputs, shapeless):
        self._compile, self._random = compile_, random
        self._fun, self._inputs, self._outputs, self._shapeless = fun, inputs, outputs, shapeless
        self._compiling_state = random.state
        self._per_thread = threading.local()
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        compiled = getattr(self._per_thread, "compiled", None)
        if compiled is None:
            # Seed the thread (mlx.thread_rng) before tracing: a key made while tracing
            # would be captured as a constant, freezing the sampler again.
            streams.adopt_current_thread()
            state = self._random.state  # this thread's key list
            compiled = self._per_thread.compiled = self._compile(
                self._fun,
                inputs=_replace(self._inputs, self._compiling_state, state),
                outputs=_replace(self._outputs, self._compiling_state, state),
                shapeless=self._shapeless)
        return compiled(*args, **kwargs)


def _rebuilt_containers_hold_values(tree: Any, state: Any) -> bool:
    """Whether a container `_replace` would copy holds a value directly (not in a container).

    MLX writes a compiled function's outputs into the captured containers; a value held
    directly by a copy would be updated in the copy, and the caller would never see it.
    """
    if tree is state or not _holds(tree, state):
        return False
    items = list(tree.values()) if isinstance(tree, dict) else list(tree)
    return any(not isinstance(item, (list, tuple, dict)) or _rebuilt_containers_hold_values(item, state)
               for item in items if item is not state)


def _compile_per_thread_when_capturing_state(random):
    def wrapper(wrapped, instance, args, kwargs):
        bound = _bind_compile_arguments(*args, **kwargs)
        state = random.state
        if not (_holds(bound["inputs"], state) or _holds(bound["outputs"], state)):
            return wrapped(*args, **kwargs)
        if any(_rebuilt_containers_hold_values(bound[side], state) for side in ("inputs", "outputs")):
            warnings.warn(f"mlx_threadsafe: {getattr(bound['fun'], '__qualname__', bound['fun'])} captures "
                          "mx.random.state in a list beside other values; it is compiled as it was, and called "
                          "off the compiling thread it keeps that thread's random key (mlx < 0.32.1)",
                          MlxThreadsafeWarning, stacklevel=3)
            return wrapped(*args, **kwargs)
        return CompiledPerThread(wrapped, random, **bound)

    return wrapper


def _bind_compile_arguments(fun, inputs=None, outputs=None, shapeless=False):
    return {"fun": fun, "inputs": inputs, "outputs": outputs, "shapeless": shapeless}


def _recompile_imported_samplers(originals: Originals) -> None:
    for name in SAMPLER_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue  # imported later, through the wrapper
        before = dict(vars(module))
        recompiled = dict(vars(importlib.reload(module)))
        # Only the samplers change: every other name keeps the object it had, so that
        # classes and functions other modules hold stay the module's own.
        vars(module).update(before)
        rebind_everywhere_many([(before[attribute], sampler) for attribute, sampler in recompiled.items()
                                if isinstance(sampler, CompiledPerThread) and attribute in before], originals)


class CompileRandomStatePatch(Patch):
    def probe(self, mlx_core: ModuleType) -> Optional[str]:
        if not isinstance(mlx_core.random.state, list):
            return "this mlx resolves a captured random state to the calling thread (mlx #3828)"
        return None

    def _apply(self, mlx_core: ModuleType) -> None:
        self.originals.set_attribute(mlx_core, "compile", wrapt.FunctionWrapper(
            mlx_core.compile, _compile_per_thread_when_capturing_state(mlx_core.random)))
        _recompile_imported_samplers(self.originals)


# The random key is per thread from 0.31.2 on every backend, streams bound or not.
PATCH = CompileRandomStatePatch(id="mlx.compile.random_state", package="mlx", trigger="mlx.core",
                                target="mlx.core.compile",
                                description="a compiled sampler advances the calling thread's key")
