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
from typing import TYPE_CHECKING, Dict, Iterable, Mapping, Optional, Union

from packaging.version import Version

from . import versions
from .patch_status import PatchStatus, State

if TYPE_CHECKING:
    from .patches import Declared
    from .registry import Patch


# ------------------------------------------------------------------ the matrix


# Named tuples, not dataclasses: dataclasses imports inspect, which install() would pay for.
MatrixRow = namedtuple("MatrixRow", "releases patches summary reason")  # Releases, ids, str, str
PackageMatrix = namedtuple("PackageMatrix", "newest_known rows")  # Version, MatrixRow tuple


class Releases:
    """A row's `releases` specifier, as packaging's SpecifierSet reads it (pre-releases included).

    Importing packaging.specifiers costs install() about 4 ms (its regular expressions), so a
    final release against ``>=``/``<`` bounds, where the two operators are plain comparisons,
    is compared directly; any other release or operator is left to SpecifierSet.
    """

    __slots__ = ("text", "_bounds")

    def __init__(self, text: str) -> None:
        self.text = text
        self._bounds = _plain_bounds(text)  # ((operator, Version), ...), or None: SpecifierSet decides

    def __repr__(self) -> str:
        return f"<Releases({self.text!r})>"

    def __str__(self) -> str:
        return self.text

    def contains(self, release: Version) -> bool:
        if self._bounds is not None and _is_final(release):
            return all(release >= bound if operator == ">=" else release < bound for operator, bound in self._bounds)
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(self.text).contains(release, prereleases=True)


def _is_final(version: Version) -> bool:
    return version.pre is None and version.post is None and version.dev is None and version.local is None


def _plain_bounds(text: str):
    bounds = []
    for clause in text.split(","):
        clause = clause.strip()
        operator = ">=" if clause.startswith(">=") else "<" if clause.startswith("<") and clause[1:2] != "=" else None
        bound = versions.parse(clause[len(operator):].strip()) if operator else None
        if bound is None or not _is_final(bound):
            return None
        bounds.append((operator, bound))
    return tuple(bounds) or None


def load_matrix(text: Optional[str] = None) -> Dict[str, PackageMatrix]:
    """The compat matrix: `text` (TOML), else the package's compat.toml.

    A wheel also carries compat.toml pre-parsed as compat.json (hatch_build.py makes it at each
    build), read in its place: tomllib and its parse cost install() about 4 ms.
    """
    if text is None:
        folder = resources.files(__package__)
        built = folder.joinpath("compat.json")
        if built.is_file():
            import json

            return _matrix(json.loads(built.read_text(encoding="utf-8")))
        text = folder.joinpath("compat.toml").read_text(encoding="utf-8")
    try:  # Python 3.11+
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return _matrix(tomllib.loads(text))


def _matrix(data: Dict) -> Dict[str, PackageMatrix]:
    return {
        package: PackageMatrix(
            newest_known=Version(entry["newest_known"]),
            rows=tuple(
                MatrixRow(Releases(row["releases"]), tuple(row["patches"]), row["summary"],
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


def by_matrix(patch: "Union[Patch, Declared]", env: versions.Environment, matrix: Dict[str, PackageMatrix]) -> Decision:
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
        if row.releases.contains(release):
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
    decision = by_options(patch, options) or plan(patch, env, matrix)
    if not decision.apply:
        return decision
    return blocked_by_requirement(patch, states) or decision


def before_import(declared: "Declared", env: versions.Environment, matrix: Dict[str, PackageMatrix],
                  options: Options) -> Optional[Decision]:
    """What decide() says from a patch's id and package alone (patches.Declared): the options
    or the matrix leave it off. None: it may apply, and its module must answer the rest.
    """
    decision = by_options(declared, options) or by_matrix(declared, env, matrix)
    return None if decision.apply else decision


def by_options(patch: "Union[Patch, Declared]", options: Options) -> Optional[Decision]:
    """Disabled by MLX_THREADSAFE_DISABLE, install(only=...) or install(exclude=...); None: not."""
    if "*" in options.disabled_by_env or patch.id in options.disabled_by_env:
        return Decision(False, "MLX_THREADSAFE_DISABLE", state=State.DISABLED)
    if options.only is not None and patch.id not in options.only:
        return Decision(False, "not in install(only=...)", state=State.DISABLED)
    if patch.id in options.exclude:
        return Decision(False, "install(exclude=...)", state=State.DISABLED)
    return None


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
