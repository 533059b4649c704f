"""A loaded model has no lazy state left: materialize it before a load call returns.

Every loader entry point (``load``, ``load_model``, adapter loading, ``sharded_load``)
is wrapped once and repointed wherever a release name-imported it. Only the
outermost call on a thread materializes: ``load`` calls ``load_model`` and
``load_adapters``, and the walk should run once, after both.

When the caller asks for ``lazy=True`` the weights stay lazy, as asked; the model
class gets a guard that turns the bare ``There is no Stream`` error of an off-thread
forward into one that says which thread built the model and how to fix it.
"""

from __future__ import annotations

import inspect
import threading
from types import ModuleType
from typing import Any, Callable, List, Optional, Sequence, Tuple

import wrapt

from ...errors import LazyModelUsedOffThread, TargetMissing, is_thread_error
from ...materialize import materialize
from ...patching.homes import module_attribute
from ...patching.rebind import rebind_everywhere_many
from ...registry import Patch

_depth = threading.local()
LAZY_MARK = "_mlx_threadsafe_lazy_thread"


def _model_in(result: Any) -> Optional[Any]:
    import mlx.nn as nn

    for item in result if isinstance(result, tuple) else (result,):
        if isinstance(item, nn.Module):
            return item
    return None


def _asked_lazy(signature: Optional[inspect.Signature], args, kwargs) -> bool:
    if signature is None or "lazy" not in signature.parameters:
        return False
    try:
        return bool(signature.bind_partial(*args, **kwargs).arguments.get("lazy", False))
    except TypeError:
        return bool(kwargs.get("lazy", False))


class LoadMaterializePatch(Patch):
    def __init__(self, *, targets: Sequence[Tuple[str, str]], **fields) -> None:
        super().__init__(target=f"{targets[0][0]}.{targets[0][1]}",
                         description="a loaded model is evaluated before the loader returns (and the other loaders)",
                         needs_thread_bound_streams=True, **fields)
        self.targets = list(targets)  # (module, function name); missing ones are skipped
        self.guarded_classes: set = set()
        self._load_hooks: List[Callable[[Any], None]] = []

    def _apply(self, module: ModuleType) -> None:
        pairs: List[Tuple[Any, Any]] = []
        for module_name, name in self.targets:
            try:
                original = module_attribute(module_name, name)
            except TargetMissing:
                continue
            if isinstance(original, wrapt.FunctionWrapper) or any(original is seen for seen, _ in pairs):
                continue  # the same function reached through another target
            pairs.append((original, wrapt.FunctionWrapper(original, self._after_load(original))))
        if not pairs:
            raise TargetMissing("none of " + ", ".join(f"{m}.{n}" for m, n in self.targets) + " exists")
        rebind_everywhere_many(pairs, self.originals)  # wrapped first, then one pass over the heap

    def revert(self) -> None:
        super().revert()
        self.guarded_classes.clear()

    def add_after_load(self, hook: Callable[[Any], None]) -> None:
        """Call `hook` with each model these loaders return, once it is materialized.

        For patches that need to see every loaded model; they declare this patch in `requires`.
        """
        self._load_hooks.append(hook)

    def remove_after_load(self, hook: Callable[[Any], None]) -> None:
        if hook in self._load_hooks:
            self._load_hooks.remove(hook)

    def _after_load(self, original):
        try:
            signature = inspect.signature(original)
        except (TypeError, ValueError):
            signature = None

        def wrapper(wrapped, instance, args, kwargs):
            depth = getattr(_depth, "value", 0)
            _depth.value = depth + 1
            try:
                result = wrapped(*args, **kwargs)
            finally:
                _depth.value = depth
            if depth:
                return result  # the outermost loader call materializes
            model = _model_in(result)
            if model is None:
                return result
            if _asked_lazy(signature, args, kwargs) or getattr(model, LAZY_MARK, None):
                self._guard_lazy(model)
            else:
                materialize(model)
            for hook in list(self._load_hooks):
                hook(model)
            return result

        return wrapper

    def _guard_lazy(self, model) -> None:
        object.__setattr__(model, LAZY_MARK, threading.current_thread().name)
        cls = type(model)
        if cls in self.guarded_classes:
            return
        self.guarded_classes.add(cls)
        self.originals.set_attribute(cls, "__call__", wrapt.FunctionWrapper(cls.__call__, _explain_off_thread))


def _explain_off_thread(wrapped, instance, args, kwargs):
    try:
        return wrapped(*args, **kwargs)
    except RuntimeError as error:
        loaded_on = getattr(instance, LAZY_MARK, None)
        if loaded_on is None or not is_thread_error(error):
            raise
        raise LazyModelUsedOffThread(
            f"this model was loaded with lazy=True on thread {loaded_on!r} and is being run on thread "
            f"{threading.current_thread().name!r}; its weights are still lazy and belong to {loaded_on!r}. "
            "Load it on the thread that runs it, load it with lazy=False, or call "
            "mlx_threadsafe.materialize(model) on the loading thread."
        ) from error
