"""Whether each patch applies here, and why: the one place that decides.

In order: the caller's and the environment's options (`only`, `exclude`,
MLX_THREADSAFE_DISABLE), the compat matrix (compat.toml) for the installed release, the
backend rules (a stream patch needs MLX to bind streams to threads; a patch may name its
backends), the patch's opt-in setting, the patches it requires, and, for a release
newer than the matrix, the patch's own probe once its module is imported. The registry
applies and reverts what this module decides.
"""

from __future__ import annotations

import os
from collections import namedtuple
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING, Dict, Iterable, Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import versions
from .patch_status import PatchStatus, State

if TYPE_CHECKING:
    from .registry import Patch

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# ------------------------------------------------------------------ the matrix


# Named tuples, not dataclasses: dataclasses imports inspect, which install() would pay for.
MatrixRow = namedtuple("MatrixRow", "releases patches summary reason")  # SpecifierSet, ids, str, str
PackageMatrix = namedtuple("PackageMatrix", "newest_known rows")  # Version, MatrixRow tuple


def load_matrix(text: Optional[str] = None) -> Dict[str, PackageMatrix]:
    if text is None:
        text = resources.files(__package__).joinpath("compat.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    return {
        package: PackageMatrix(
            newest_known=Version(entry["newest_known"]),
            rows=tuple(
                MatrixRow(SpecifierSet(row["releases"]), tuple(row["patches"]), row["summary"],
                          " ".join(row["reason"].split()))
                for row in entry.get("rows", ())
            ),
        )
        for package, entry in data.items()
    }


# ------------------------------------------------------------------ decisions


class Decision(namedtuple("Decision", "apply reason unknown_release state",
                          defaults=(False, State.SKIPPED))):
    """`apply`, or the `state` the patch takes instead (skipped, disabled), with the `reason`.

    `unknown_release`: newer than the matrix, so the patch's probe has the last word.
    """

    __slots__ = ()


class Options(namedtuple("Options", "only exclude disabled_by_env", defaults=(None, frozenset(), frozenset()))):
    """install(only=..., exclude=...) and MLX_THREADSAFE_DISABLE."""

    __slots__ = ()

    @classmethod
    def of_install(cls, only: Optional[Iterable[str]], exclude: Optional[Iterable[str]]) -> "Options":
        disabled = os.environ.get("MLX_THREADSAFE_DISABLE", "")
        return cls(frozenset(only) if only is not None else None, frozenset(exclude or ()),
                   frozenset(item.strip() for item in disabled.split(",") if item.strip()))


def by_matrix(patch: "Patch", env: versions.Environment, matrix: Dict[str, PackageMatrix]) -> Decision:
    """Whether the matrix applies `patch` to the installed release of its package."""
    installed = env.version_of(patch.package)
    if installed is None:
        return Decision(False, f"{patch.package} is not installed")
    release = versions.parse(installed)
    package_matrix = matrix.get(patch.package)
    if release is None or package_matrix is None:
        return Decision(False, f"{patch.package} {installed}: no matrix data for this version")
    if release > package_matrix.newest_known:
        return Decision(True, f"{patch.package} {installed} is newer than the matrix ({package_matrix.newest_known}); "
                        "applied because its feature probe holds", unknown_release=True)
    for row in package_matrix.rows:
        if row.releases.contains(release, prereleases=True):
            if patch.id in row.patches:
                return Decision(True, f"{patch.package} {installed}: {row.summary}")
            return Decision(False, f"not needed on {patch.package} {installed}: {row.summary}")
    return Decision(False, f"{patch.package} {installed} is older than the matrix covers")


def plan(patch: "Patch", env: versions.Environment, matrix: Dict[str, PackageMatrix]) -> Decision:
    """What the matrix and the backend rule say, options and requirements aside (the evidence harness asks)."""
    decision = by_matrix(patch, env, matrix)
    if not decision.apply:
        return decision
    if patch.needs_thread_bound_streams and not env.streams_bound_to_threads:
        return Decision(False, f"mlx {env.mlx} on {env.backend} does not bind streams to threads")
    if patch.backends is not None and env.backend not in patch.backends:
        return Decision(False, f"only on the {' or '.join(patch.backends)} backend; mlx runs on {env.backend} here")
    if patch.enabled_by is not None:
        variable, value = patch.enabled_by
        if os.environ.get(variable, "").strip().lower() != value:
            return Decision(False, f"opt-in: {variable}={value} applies it")
    return decision


def decide(patch: "Patch", env: versions.Environment, matrix: Dict[str, PackageMatrix], options: Options,
           states: Mapping[str, PatchStatus]) -> Decision:
    """At install(): options, matrix, backend rule, requirements (`states`: the rows planned so far)."""
    if "*" in options.disabled_by_env or patch.id in options.disabled_by_env:
        return Decision(False, "MLX_THREADSAFE_DISABLE", state=State.DISABLED)
    if options.only is not None and patch.id not in options.only:
        return Decision(False, "not in install(only=...)", state=State.DISABLED)
    if patch.id in options.exclude:
        return Decision(False, "install(exclude=...)", state=State.DISABLED)
    decision = plan(patch, env, matrix)
    if not decision.apply:
        return decision
    return blocked_by_requirement(patch, states) or decision


def at_import(patch: "Patch", module: ModuleType, decision: Decision,
              states: Mapping[str, PatchStatus]) -> Decision:
    """When the trigger module is there: requirements again (one may have failed since), then the probe."""
    blocked = blocked_by_requirement(patch, states)
    if blocked:
        return blocked
    if decision.unknown_release:
        not_needed = patch.probe(module)
        if not_needed:
            return Decision(False, not_needed)
    return decision


def blocked_by_requirement(patch: "Patch", states: Mapping[str, PatchStatus]) -> Optional[Decision]:
    """Disabled when a patch it requires was disabled or failed.

    A requirement skipped as not needed here (the matrix, the backend) leaves the
    dependent on: what it needs the requirement for is not needed here either.
    """
    for required in patch.requires:
        row = states.get(required)
        if row is None or row.state in (State.DISABLED, State.FAILED, State.NOT_INSTALLED):
            why = f"{row.state}: {row.reason}" if row is not None else "not planned"
            return Decision(False, f"requires {required}, which is {why}", state=State.DISABLED)
    return None
