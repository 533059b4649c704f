"""The catalogue: every scenario by name, with its description, and what a scenario may raise."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional


class NotApplicable(Exception):
    """The release under test lacks what the scenario exercises (e.g. no BatchGenerator yet)."""


def require(module: str, attribute: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        raise NotApplicable(f"no {module}.{attribute} in this release") from None


SCENARIOS: Dict[str, Callable[[], str]] = {}
DESCRIPTIONS: Dict[str, str] = {}
_DOCTOR_PLACES: Dict[str, int] = {}


def scenario(description: str, *, name: Optional[str] = None, doctor: Optional[int] = None):
    """Register a scenario under `name` (by default the function's own).

    `doctor`: its place in what ``mlx-threadsafe doctor`` runs when given no names (the
    scenarios on tiny mlx-lm models that show what the shim fixes, quickest to read first).
    """
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        key = name or fn.__name__
        SCENARIOS[key] = fn
        DESCRIPTIONS[key] = description
        if doctor is not None:
            _DOCTOR_PLACES[key] = doctor
        return fn

    return register


def doctor_scenarios() -> List[str]:
    """What ``mlx-threadsafe doctor`` runs by default, in order."""
    return sorted(_DOCTOR_PLACES, key=_DOCTOR_PLACES.__getitem__)
