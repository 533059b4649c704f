"""Find the module a release keeps a target in: releases move targets between modules."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Callable, Sequence

from ..errors import TargetMissing


def home_of(name: str, module_names: Sequence[str],
            accept: Callable[[Any, ModuleType], bool] = lambda value, module: True) -> ModuleType:
    """The first imported module of `module_names` whose globals hold an accepted `name`.

    `module_names` are listed newest layout first. Raises TargetMissing when none does.
    """
    for module_name in module_names:
        module = sys.modules.get(module_name)
        if module is not None and name in vars(module) and accept(vars(module)[name], module):
            return module
    raise TargetMissing(f"no {name} in {', '.join(module_names)}")


def module_attribute(module_name: str, name: str) -> Any:
    """``module_name.name`` read from the module's own globals; TargetMissing if absent."""
    return vars(home_of(name, [module_name]))[name]


def find_class(module_names: Sequence[str], class_name: str) -> Any:
    """The class `class_name` from the first of `module_names` that defines one."""
    home = home_of(class_name, module_names, lambda value, module: isinstance(value, type))
    return vars(home)[class_name]


def defined_in_its_home(value: Any, module: ModuleType) -> bool:
    """Whether `value` was defined by `module` (not name-imported from another one)."""
    return getattr(value, "__module__", None) == module.__name__
