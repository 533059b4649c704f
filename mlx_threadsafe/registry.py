"""The patch contract, and the registry that keeps it: which patches apply here, and their state.

install() reads the versions and the compat matrix (compat.toml); for each patch it
decides disabled / skipped / apply now / apply when its trigger module is imported.
Every apply and every revert is caught, so one broken patch never breaks the host
program: its row says `failed` and why.
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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import versions
from .errors import MlxThreadsafeWarning, TargetMissing
from .patch_status import PatchStatus, State, Status
from .patching.originals import Originals, Replacement

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("mlx_threadsafe")


class Patch:
    """The contract every patch keeps (OpenTelemetry's BaseInstrumentor shape).

    A patch declares its `id` (``<package module>.<target>.<what>``), the distribution
    it fixes (`package`, a row family of the compat matrix), the module whose import
    triggers it (`trigger`), what it rewrites (`target`), the patches it relies on
    (`requires`) and whether it is only needed where MLX binds streams to threads.
    `apply(module)` runs `_apply` with the triggering module; everything `_apply`
    replaces is recorded in `self.originals`, so `revert()` puts the very same
    objects back, newest first. `_apply` raises TargetMissing when the release lacks
    the target. `probe(module)` says why the patch is not needed on a release newer
    than the matrix knows (None: apply it).
    """

    def __init__(self, id: str, package: str, trigger: str, target: str, *,
                 requires: Sequence[str] = (), needs_thread_bound_streams: bool = False) -> None:
        self.id = id
        self.package = package
        self.trigger = trigger
        self.target = target
        self.requires = tuple(requires)
        self.needs_thread_bound_streams = needs_thread_bound_streams
        self.originals = Originals()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def probe(self, module: ModuleType) -> Optional[str]:
        return None

    def apply(self, module: ModuleType) -> None:
        self._apply(module)

    def revert(self) -> None:
        self.originals.restore()

    def replacements(self) -> List[Replacement]:
        """Everything this patch replaced, as recorded (what the contract tests check)."""
        return list(self.originals.records)

    def _apply(self, module: ModuleType) -> None:
        raise NotImplementedError


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
    # MLX_THREADSAFE_LOG=debug logs what the shim does; to stderr, or to MLX_THREADSAFE_LOG_FILE
    # (appended), so that a program's own output stays exactly what it is without the shim.
    if os.environ.get("MLX_THREADSAFE_LOG", "").lower() == "debug" and not log.handlers:
        path = os.environ.get("MLX_THREADSAFE_LOG_FILE")
        handler = logging.FileHandler(path, delay=True) if path else logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mlx_threadsafe: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)


class Registry:
    """Holds every known patch and the state of each; one instance per process."""

    def __init__(self, patches: Sequence[Patch]) -> None:
        self.patches = list(patches)
        self._by_id = {patch.id: patch for patch in self.patches}
        for patch in self.patches:
            missing = [required for required in patch.requires if required not in self._by_id]
            if missing:
                raise ValueError(f"{patch.id} requires unknown patch(es) {missing}")
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
        if unknown - set(self._by_id):
            raise ValueError(f"unknown patch id(s): {sorted(unknown - set(self._by_id))}; known: {sorted(self._by_id)}")
        disabled_by_env = set(_env_list("MLX_THREADSAFE_DISABLE"))
        env = versions.detect()
        matrix = load_matrix()
        with self._lock:
            self._installed = True
            for patch in self.patches:  # a required patch comes before the patches that require it
                current = self._states.get(patch.id)
                if current is not None and current.state in (State.APPLIED, State.PENDING):
                    continue  # idempotent: an applied patch is never applied twice
                self._states[patch.id] = self._plan(patch, env, matrix, only_ids, set(exclude or ()), disabled_by_env)
            return self.status()

    def uninstall(self) -> Status:
        with self._lock:
            for patch in reversed(self.patches):
                row = self._states.get(patch.id)
                if row is not None and row.state == State.APPLIED and not self._revert(patch):
                    self._warn(patch.id, f"mlx_threadsafe: reverting {patch.id} failed (see the log)")
            # Pending hooks stay registered with wrapt (it has no unregister) but
            # find no pending row when they fire, which cancels them.
            self._states.clear()
            self._pending_decisions.clear()
            self._installed = False
            return self.status()

    def is_installed(self) -> bool:
        return self._installed

    def status(self) -> Status:
        with self._lock:
            rows = tuple(self._states.get(p.id) or _row(p, State.NOT_INSTALLED, "install() not called")
                         for p in self.patches)
            return Status(rows=rows, environment=versions.detect(), installed=self._installed)

    # -- planning ------------------------------------------------------

    def _plan(self, patch, env, matrix, only_ids, exclude_ids, disabled_by_env) -> PatchStatus:
        if "*" in disabled_by_env or patch.id in disabled_by_env:
            return _row(patch, State.DISABLED, "MLX_THREADSAFE_DISABLE")
        if only_ids is not None and patch.id not in only_ids:
            return _row(patch, State.DISABLED, "not in install(only=...)")
        if patch.id in exclude_ids:
            return _row(patch, State.DISABLED, "install(exclude=...)")
        decision = plan(patch, env, matrix)
        if not decision.apply:
            return _row(patch, State.SKIPPED, decision.reason)
        blocked = self._blocked_by_requirement(patch)
        if blocked:
            return _row(patch, State.DISABLED, blocked)
        if decision.unknown_release:
            self._warn(
                f"unknown:{patch.package}",
                f"mlx_threadsafe: {patch.package} {env.version_of(patch.package)} is newer than the "
                "compat matrix knows; patches are applied where their feature probes hold",
            )
        if patch.trigger in sys.modules:
            return self._apply(patch, sys.modules[patch.trigger], decision)
        self._pending_decisions[patch.id] = decision
        self._hook(patch.trigger)
        return _row(patch, State.PENDING, f"applies when {patch.trigger} is imported")

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
                    if patch.trigger == module.__name__ and row is not None and row.state == State.PENDING:
                        decision = self._pending_decisions.pop(patch.id)
                        self._states[patch.id] = self._apply(patch, module, decision)
        except Exception:  # noqa: BLE001
            log.exception("post-import hook for %s failed", module.__name__)

    def _apply(self, patch: Patch, module: ModuleType, decision: Decision) -> PatchStatus:
        blocked = self._blocked_by_requirement(patch)
        if blocked:
            return _row(patch, State.DISABLED, blocked)
        try:
            if decision.unknown_release:
                not_needed = patch.probe(module)
                if not_needed:
                    return _row(patch, State.SKIPPED, not_needed)
            patch.apply(module)
        except TargetMissing as missing:
            if not self._revert(patch):
                return _row(patch, State.FAILED, f"target moved ({missing}) and the partial apply did not revert")
            return _row(patch, State.SKIPPED, f"target moved: {missing}")
        except Exception as error:  # noqa: BLE001 - one broken patch never breaks the host
            self._revert(patch)
            self._warn(patch.id, f"mlx_threadsafe: patch {patch.id} failed and was not applied: {error!r}")
            log.debug("apply of %s failed", patch.id, exc_info=True)
            return _row(patch, State.FAILED, repr(error))
        log.debug("applied %s", patch.id)
        return _row(patch, State.APPLIED, decision.reason)

    def _blocked_by_requirement(self, patch: Patch) -> Optional[str]:
        """Why `patch` cannot apply: a patch it requires was disabled or failed.

        A requirement skipped as not needed here (the matrix, the backend) leaves the
        dependent on: what it needs the requirement for is not needed here either.
        """
        for required in patch.requires:
            row = self._states.get(required)
            if row is None or row.state in (State.DISABLED, State.FAILED, State.NOT_INSTALLED):
                why = f"{row.state}: {row.reason}" if row is not None else "not planned"
                return f"requires {required}, which is {why}"
        return None

    def _revert(self, patch: Patch) -> bool:
        """Revert `patch`; False (logged) if its revert raised."""
        try:
            patch.revert()
            log.debug("reverted %s", patch.id)
            return True
        except Exception:  # noqa: BLE001 - a revert never breaks the host either
            log.exception("reverting %s failed", patch.id)
            return False

    def _warn(self, key: str, message: str) -> None:
        log.info(message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MlxThreadsafeWarning, stacklevel=4)


def _row(patch: Patch, state: State, reason: str) -> PatchStatus:
    log.debug("%s: %s (%s)", patch.id, state, reason)
    return PatchStatus(patch.id, patch.target, patch.trigger, state, reason)
