"""The catalogue: every scenario by name, with its description, and what a scenario may raise."""

from __future__ import annotations

from typing import Callable, Dict


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


def scenario(description: str):
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        SCENARIOS[fn.__name__] = fn
        DESCRIPTIONS[fn.__name__] = description
        return fn

    return register


