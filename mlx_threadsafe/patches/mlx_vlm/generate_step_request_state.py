"""mlx_vlm.generate_step.request_state: state a model keeps for one request stays with that request.

MRoPE models (qwen2_vl, qwen2_5_vl, qwen3_vl, glm4v, ...) write ``_rope_deltas`` and
``_position_ids`` onto the shared model at the prefill and read them at every decode step, so
concurrent requests overwrite each other's positions (mlx-vlm #1415) and a decode on another
thread than the prefill fails. Each ``generate_step`` step of such a model runs under the model's
lock with its request's own values swapped in (evaluated, then taken back out); other models pass
straight through. For raw forwards (no ``generate_step``), the classes holding that state evaluate
it after every forward (a hook on mlx_vlm.load.materialize), which covers the thread hop only.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Dict, List, Tuple

import wrapt

from ...materialize import materialize
from ...patching.homes import defined_in_its_home, home_of
from ...patching.originals import Originals
from ...patching.rebind import rebind_everywhere
from ...registry import Patch
from . import load_materialize

log = logging.getLogger("mlx_threadsafe")

STATE_NAMES = ("_rope_deltas", "_position_ids")
HOMES = ["mlx_vlm.generate.ar", "mlx_vlm.generate", "mlx_vlm.utils"]  # newest layout first
_REQUEST_STATE = "_mlx_threadsafe_request_state"
_registering = threading.Lock()


class _ModelRequestState:
    """The modules of one model that hold request state, and the lock over them."""

    def __init__(self, model) -> None:
        self.holders: List[Tuple[object, str]] = [
            (module, name) for module in _modules(model) for name in STATE_NAMES if _has_attribute(module, name)
        ]
        self.lock = threading.Lock()

    def put(self, values: Dict[int, object]) -> None:
        for index, (module, name) in enumerate(self.holders):
            setattr(module, name, values.get(index))

    def take(self) -> Dict[int, object]:
        values = {index: getattr(module, name, None) for index, (module, name) in enumerate(self.holders)}
        materialize(values, into_objects=False)
        return values


def _modules(model) -> list:
    modules = getattr(model, "modules", None)
    return modules() if callable(modules) else [model]


def _has_attribute(module, name: str) -> bool:
    # An nn.Module keeps None in its __dict__ and an array as a dict item.
    return name in vars(module) or (isinstance(module, dict) and name in module)


def _request_state(model) -> _ModelRequestState:
    state = vars(model).get(_REQUEST_STATE)
    if state is None:
        with _registering:
            state = vars(model).get(_REQUEST_STATE)
            if state is None:
                state = _ModelRequestState(model)
                object.__setattr__(model, _REQUEST_STATE, state)
    return state


def _steps_with_own_state(steps, state: _ModelRequestState):
    values: Dict[int, object] = {}  # a clean start, as on a freshly loaded model
    try:
        while True:
            with state.lock:
                state.put(values)
                try:
                    item = next(steps)
                except StopIteration:
                    return
                finally:
                    values = state.take()
            yield item
    finally:
        steps.close()


def _per_request_state(wrapped, instance, args, kwargs):
    model = args[1] if len(args) > 1 else kwargs.get("model")
    steps = wrapped(*args, **kwargs)
    if model is None or not hasattr(model, "__dict__"):
        return steps
    state = _request_state(model)
    return _steps_with_own_state(steps, state) if state.holders else steps


def _evaluate_state_after_forward(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    # Cheap once evaluated: only the values a prefill leaves compute here.
    materialize([getattr(instance, name, None) for name in STATE_NAMES], into_objects=False)
    return result


def _evaluate_state_of_every_forward(originals: Originals, wrapped_classes: set):
    def hook(model) -> None:
        """A loader hook: the state-holding classes of `model` evaluate their state per forward."""
        for cls in {type(module) for module, _ in _request_state(model).holders}:
            if cls not in wrapped_classes:
                wrapped_classes.add(cls)
                originals.set_attribute(cls, "__call__",
                                        wrapt.FunctionWrapper(cls.__call__, _evaluate_state_after_forward))

    return hook


class RequestStatePatch(Patch):
    def _apply(self, package: ModuleType) -> None:
        home = home_of("generate_step", HOMES, defined_in_its_home)
        original = home.generate_step
        unreachable = rebind_everywhere(original, wrapt.FunctionWrapper(original, _per_request_state),
                                        self.originals)
        if unreachable:
            log.debug("generate_step copies left unwrapped: %s", "; ".join(sorted(set(unreachable))))
        # Models mlx-vlm's loaders return (mlx_vlm.load.materialize, hence `requires`).
        loaders = load_materialize.PATCH
        wrapped_classes: set = set()
        hook = _evaluate_state_of_every_forward(self.originals, wrapped_classes)
        loaders.add_after_load(hook)
        self.originals.on_restore(lambda: loaders.remove_after_load(hook))
        self.originals.on_restore(wrapped_classes.clear)


# Two requests overwrite each other's positions whether or not streams are thread-bound.
PATCH = RequestStatePatch(id="mlx_vlm.generate_step.request_state", package="mlx-vlm", trigger="mlx_vlm",
                          target="mlx_vlm.generate.generate_step",
                          description="each request keeps its own rope positions on a shared model",
                          requires=["mlx_vlm.load.materialize"])
