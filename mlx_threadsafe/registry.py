"""The patch contract, and the registry that keeps it: applies and reverts patches, holds their state.

Whether a patch applies is `planning`'s to decide; the registry applies it now or when its
trigger module is imported, and catches every apply and revert, so one broken patch never
breaks the host program: its row says `failed` and why.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import wrapt

from . import planning, versions
from .errors import MlxThreadsafeWarning, TargetMissing
from .patch_status import PatchStatus, State, Status
from .patching.originals import Originals, Replacement

if TYPE_CHECKING:
    from .patches import Declared

log = logging.getLogger("mlx_threadsafe")


class Patch:
    """The contract every patch keeps (OpenTelemetry's BaseInstrumentor shape).

    A patch declares its `id` (``<package module>.<target>.<what>``), the distribution
    it fixes (`package`, a row family of the compat matrix), the module whose import
    triggers it (`trigger`), the dotted path of what it rewrites (`target`; `description`
    says it in words), the patches it relies on
    (`requires`), whether it is only needed where MLX binds streams to threads, on which
    `backends` it applies (None: all), and the setting it is `enabled_by`, if it waits for one.
    `apply(module)` runs `_apply` with the triggering module; everything `_apply`
    replaces is recorded in `self.originals`, so `revert()` puts the very same
    objects back, newest first. `_apply` raises TargetMissing when the release lacks
    the target. `probe(module)` says why the patch is not needed on a release newer
    than the matrix knows (None: apply it).
    """

    def __init__(self, *, id: str, package: str, trigger: str, target: str, description: str = "",
                 requires: Sequence[str] = (), needs_thread_bound_streams: bool = False,
                 backends: Optional[Sequence[str]] = None, enabled_by: Optional[Tuple[str, str]] = None) -> None:
        self.id = id
        self.package = package
        self.trigger = trigger
        self.target = target  # a dotted path: module.attribute[.attribute]
        self.description = description  # what it does there, for people
        self.requires = tuple(requires)
        self.needs_thread_bound_streams = needs_thread_bound_streams
        self.backends = tuple(backends) if backends is not None else None  # None: every backend
        self.enabled_by = enabled_by  # (variable, value): applied only where the user set it so
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


# ------------------------------------------------------------------ state


def _configure_logging() -> None:
    # MLX_THREADSAFE_LOG=debug logs what the shim does; to stderr, or to MLX_THREADSAFE_LOG_FILE
    # (appended), so that a program's own output stays exactly what it is without the shim.
    if os.environ.get("MLX_THREADSAFE_LOG", "").lower() == "debug" and not log.handlers:
        path = os.environ.get("MLX_THREADSAFE_LOG_FILE")
        handler = logging.FileHandler(path, delay=True) if path else logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mlx_threadsafe: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        # Our handler has it: the debug lines must not also reach a handler the program
        # put on the root logger (vllm-mlx does), which would print them into its output.
        log.propagate = False


class Registry:
    """Holds every known patch and the state of each; one instance per process.

    `patches`, in planning order, may hold declarations (patches.Declared) in place of
    patches: a patch's module is imported, and the patch takes its place, only when the
    options and the matrix leave it on.
    """

    def __init__(self, patches: "Sequence[Union[Patch, Declared]]") -> None:
        self.patches: "List[Union[Patch, Declared]]" = list(patches)
        self._by_id = {patch.id: patch for patch in self.patches}
        for patch in self.patches:
            missing = [required for required in getattr(patch, "requires", ()) if required not in self._by_id]
            if missing:
                raise ValueError(f"{patch.id} requires unknown patch(es) {missing}")
        self._lock = threading.RLock()
        self._installed = False
        self._states: Dict[str, PatchStatus] = {}
        self._hooked_modules: set = set()
        self._warned: set = set()
        self._pending_decisions: Dict[str, planning.Decision] = {}

    # -- public --------------------------------------------------------

    def install(self, only: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None) -> Status:
        _configure_logging()
        unknown = set(only or ()) | set(exclude or ())
        if unknown - set(self._by_id):
            raise ValueError(f"unknown patch id(s): {sorted(unknown - set(self._by_id))}; known: {sorted(self._by_id)}")
        options = planning.Options.of_install(only, exclude)
        env = versions.detect()
        matrix = planning.load_matrix()
        with self._lock:
            self._installed = True
            for index, entry in enumerate(self.patches):  # a required patch comes before those requiring it
                current = self._states.get(entry.id)
                if current is not None and current.state in (State.APPLIED, State.PENDING):
                    continue  # idempotent: an applied patch is never applied twice
                self._states[entry.id] = self._plan(index, entry, env, matrix, options)
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

    # -- applying what planning decided ---------------------------------

    def _plan(self, index: int, entry: "Union[Patch, Declared]", env: versions.Environment,
              matrix: Dict[str, planning.PackageMatrix], options: planning.Options) -> PatchStatus:
        # A patch the options or the matrix leave off is decided from its declaration: its
        # module is never imported. Any other is loaded and takes the declaration's place.
        left_off = None if isinstance(entry, Patch) else planning.before_import(entry, env, matrix, options)
        if left_off is not None:
            return _row(entry, left_off.state, left_off.reason)
        patch = self.patches[index] = self._by_id[entry.id] = _loaded(entry)
        return self._carry_out(patch, planning.decide(patch, env, matrix, options, self._states), env)

    def _carry_out(self, patch: Patch, decision: planning.Decision, env: versions.Environment) -> PatchStatus:
        if not decision.apply:
            return _row(patch, decision.state, decision.reason)
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
                        decision = self._pending_decisions.pop(patch.id)  # a pending patch was loaded
                        self._states[patch.id] = self._apply(patch, module, decision)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001
            log.exception("post-import hook for %s failed", module.__name__)

    def _apply(self, patch: Patch, module: ModuleType, decision: planning.Decision) -> PatchStatus:
        decision = planning.at_import(patch, module, decision, self._states)
        if not decision.apply:
            return _row(patch, decision.state, decision.reason)
        try:
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


def _loaded(entry: "Union[Patch, Declared]") -> Patch:
    if isinstance(entry, Patch):
        return entry
    from .patches import load

    return load(entry)


def _row(patch: "Union[Patch, Declared]", state: State, reason: str) -> PatchStatus:
    log.debug("%s: %s (%s)", patch.id, state, reason)
    return PatchStatus(patch.id, patch.target, patch.trigger, state, reason)
