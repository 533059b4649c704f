"""The patch registry: which patches exist, which apply here, and their state.

install() flows as DESIGN.md draws it: read the versions and the compat matrix; for
each patch decide disabled / skipped / apply now / apply on import; every apply is
caught, so one broken patch never breaks the host program.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from types import ModuleType
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import versions

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("mlx_threadsafe")

APPLIED = "applied"
PENDING = "pending-import"
SKIPPED = "skipped"
FAILED = "failed"
DISABLED = "disabled"
NOT_INSTALLED = "not-installed"


class MlxThreadsafeWarning(UserWarning):
    """Something the shim could not do; filter it like any other warning category."""


class TargetMissing(Exception):
    """Raised by apply() when the release does not have what the patch rewrites.

    The patch is reported `skipped` with this message: the library moved on, the
    host program is fine.
    """


@dataclass(frozen=True)
class Patch:
    """One patch: a target in one module, and apply/revert that undo each other exactly.

    `probe(module)` returns why the patch is not needed on a release the compat matrix
    does not know yet (None: apply it).
    """

    id: str
    package: str
    module: str
    apply: Callable[[ModuleType], None]
    revert: Callable[[], None]
    probe: Callable[[ModuleType], Optional[str]] = lambda module: None
    needs_thread_bound_streams: bool = True


@dataclass(frozen=True)
class PatchStatus:
    id: str
    target: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Status:
    rows: Tuple[PatchStatus, ...]
    environment: versions.Environment
    installed: bool

    @property
    def versions(self) -> Dict[str, Optional[str]]:
        return {name: self.environment.version_of(name) for name in versions.TRACKED}

    def __iter__(self) -> Iterator[PatchStatus]:
        return iter(self.rows)

    def __getitem__(self, patch_id: str) -> PatchStatus:
        for row in self.rows:
            if row.id == patch_id:
                return row
        raise KeyError(patch_id)

    def ids(self, state: str) -> List[str]:
        return [row.id for row in self.rows if row.state == state]

    def __str__(self) -> str:
        header = ("patch", "target", "state", "reason")
        lines = [(r.id, r.target, r.state, r.reason) for r in self.rows]
        widths = [max(len(x[i]) for x in [header] + lines) for i in range(3)]
        out = [
            f"mlx_threadsafe ({'installed' if self.installed else 'not installed'}): "
            + self.environment.describe()
        ]
        for row in [header] + lines:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        return "\n".join(line.rstrip() for line in out)


# ------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class MatrixRow:
    releases: SpecifierSet
    patches: Tuple[str, ...]
    summary: str
    reason: str


@dataclass(frozen=True)
class PackageMatrix:
    newest_known: Version
    rows: Tuple[MatrixRow, ...]


def load_matrix(text: Optional[str] = None) -> Dict[str, PackageMatrix]:
    if text is None:
        text = resources.files(__package__).joinpath("compat.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    return {
        package: PackageMatrix(
            newest_known=Version(entry["newest_known"]),
            rows=tuple(
                MatrixRow(
                    SpecifierSet(row["releases"]),
                    tuple(row["patches"]),
                    row["summary"],
                    " ".join(row["reason"].split()),
                )
                for row in entry.get("rows", ())
            ),
        )
        for package, entry in data.items()
    }


@dataclass(frozen=True)
class Decision:
    apply: bool
    reason: str
    unknown_release: bool = False


def decide(patch: Patch, env: versions.Environment, matrix: Dict[str, PackageMatrix]) -> Decision:
    """Whether the matrix applies `patch` to the installed release of its package."""
    installed = env.version_of(patch.package)
    if installed is None:
        return Decision(False, f"{patch.package} is not installed")
    release = versions.parse(installed)
    package_matrix = matrix.get(patch.package)
    if release is None or package_matrix is None:
        return Decision(False, f"{patch.package} {installed}: no matrix data for this version")
    if release > package_matrix.newest_known:
        return Decision(
            True,
            f"{patch.package} {installed} is newer than the matrix ({package_matrix.newest_known}); "
            "applied because its feature probe holds",
            unknown_release=True,
        )
    for row in package_matrix.rows:
        if row.releases.contains(release, prereleases=True):
            if patch.id in row.patches:
                return Decision(True, f"{patch.package} {installed}: {row.summary}")
            return Decision(False, f"not needed on {patch.package} {installed}: {row.summary}")
    return Decision(False, f"{patch.package} {installed} is older than the matrix covers")


def plan(patch: Patch, env: versions.Environment, matrix: Dict[str, PackageMatrix]) -> Decision:
    """What install() does with `patch` in `env`, options aside: the matrix, then the backend rule."""
    decision = decide(patch, env, matrix)
    if decision.apply and patch.needs_thread_bound_streams and not env.streams_bound_to_threads:
        return Decision(False, f"mlx {env.mlx} on {env.backend} does not bind streams to threads")
    return decision


# ------------------------------------------------------------------ state


def _env_list(name: str) -> List[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _configure_logging() -> None:
    if os.environ.get("MLX_THREADSAFE_LOG", "").lower() == "debug" and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mlx_threadsafe: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)


class Registry:
    """Holds every known patch and the state of each; one instance per process."""

    def __init__(self, patches: Sequence[Patch]) -> None:
        self.patches = list(patches)
        self._lock = threading.RLock()
        self._installed = False
        self._states: Dict[str, PatchStatus] = {}
        self._hooked_modules: set = set()
        self._warned: set = set()
        self._pending_decisions: Dict[str, Decision] = {}

    # -- public --------------------------------------------------------

    def install(self, only: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None) -> Status:
        _configure_logging()
        only_ids = set(only) if only is not None else None
        unknown = (only_ids or set()) | set(exclude or ())
        known_ids = {p.id for p in self.patches}
        if unknown - known_ids:
            raise ValueError(f"unknown patch id(s): {sorted(unknown - known_ids)}; known: {sorted(known_ids)}")
        disabled_by_env = set(_env_list("MLX_THREADSAFE_DISABLE"))
        env = versions.detect()
        matrix = load_matrix()
        with self._lock:
            self._installed = True
            for patch in self.patches:
                current = self._states.get(patch.id)
                if current is not None and current.state in (APPLIED, PENDING):
                    continue  # idempotent: an applied patch is never applied twice
                self._states[patch.id] = self._plan(patch, env, matrix, only_ids, set(exclude or ()), disabled_by_env)
            return self.status()

    def uninstall(self) -> Status:
        with self._lock:
            for patch in reversed(self.patches):
                row = self._states.get(patch.id)
                if row is not None and row.state == APPLIED:
                    try:
                        patch.revert()
                        log.debug("reverted %s", patch.id)
                    except Exception as error:  # noqa: BLE001 - uninstall must finish
                        self._warn(patch.id, f"mlx_threadsafe: reverting {patch.id} failed: {error!r}")
            # Pending hooks stay registered with wrapt (it has no unregister) but
            # find no pending row when they fire, which cancels them.
            self._states.clear()
            self._installed = False
            return self.status()

    def is_installed(self) -> bool:
        return self._installed

    def status(self) -> Status:
        with self._lock:
            rows = tuple(
                self._states.get(p.id) or PatchStatus(p.id, p.module, NOT_INSTALLED, "install() not called")
                for p in self.patches
            )
            return Status(rows=rows, environment=versions.detect(), installed=self._installed)

    # -- planning ------------------------------------------------------

    def _plan(self, patch, env, matrix, only_ids, exclude_ids, disabled_by_env) -> PatchStatus:
        def row(state: str, reason: str) -> PatchStatus:
            log.debug("%s: %s (%s)", patch.id, state, reason)
            return PatchStatus(patch.id, patch.module, state, reason)

        if "*" in disabled_by_env or patch.id in disabled_by_env:
            return row(DISABLED, "MLX_THREADSAFE_DISABLE")
        if only_ids is not None and patch.id not in only_ids:
            return row(DISABLED, "not in install(only=...)")
        if patch.id in exclude_ids:
            return row(DISABLED, "install(exclude=...)")
        decision = plan(patch, env, matrix)
        if not decision.apply:
            return row(SKIPPED, decision.reason)
        if decision.unknown_release:
            self._warn(
                f"unknown:{patch.package}",
                f"mlx_threadsafe: {patch.package} {env.version_of(patch.package)} is newer than the "
                "compat matrix knows; patches are applied where their feature probes hold",
            )
        if patch.module in sys.modules:
            return self._apply(patch, sys.modules[patch.module], decision)
        self._pending_decisions[patch.id] = decision
        self._hook(patch.module)
        return row(PENDING, f"applies when {patch.module} is imported")

    def _hook(self, module_name: str) -> None:
        if module_name in self._hooked_modules:
            return
        self._hooked_modules.add(module_name)
        wrapt.register_post_import_hook(self._on_import, module_name)

    def _on_import(self, module: ModuleType) -> None:
        # wrapt lets an exception from a hook fail the user's import: never raise here.
        try:
            with self._lock:
                self._hooked_modules.discard(module.__name__)
                for patch in self.patches:
                    row = self._states.get(patch.id)
                    if patch.module == module.__name__ and row is not None and row.state == PENDING:
                        decision = self._pending_decisions.pop(patch.id)
                        self._states[patch.id] = self._apply(patch, module, decision)
        except Exception:  # noqa: BLE001
            log.exception("post-import hook for %s failed", module.__name__)

    def _apply(self, patch: Patch, module: ModuleType, decision: Decision) -> PatchStatus:
        try:
            if decision.unknown_release:
                not_needed = patch.probe(module)
                if not_needed:
                    return PatchStatus(patch.id, patch.module, SKIPPED, not_needed)
            patch.apply(module)
        except TargetMissing as missing:
            patch.revert()
            return PatchStatus(patch.id, patch.module, SKIPPED, f"target moved: {missing}")
        except Exception as error:  # noqa: BLE001 - one broken patch never breaks the host
            try:
                patch.revert()
            except Exception:  # noqa: BLE001
                log.exception("revert after a failed apply of %s", patch.id)
            self._warn(patch.id, f"mlx_threadsafe: patch {patch.id} failed and was not applied: {error!r}")
            log.debug("apply of %s failed", patch.id, exc_info=True)
            return PatchStatus(patch.id, patch.module, FAILED, repr(error))
        log.debug("applied %s", patch.id)
        return PatchStatus(patch.id, patch.module, APPLIED, decision.reason)

    def _warn(self, key: str, message: str) -> None:
        log.info(message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MlxThreadsafeWarning, stacklevel=4)
