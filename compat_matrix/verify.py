"""Run the scenarios on real releases, record the evidence, and hold the runtime matrix to it.

For each release and mlx pairing: a venv (uv), the scenarios without and then with the
shim (one process per side; a scenario that kills its process is re-run alone), and the
patches the shim applied there. `check()` then compares the runtime matrix
(`mlx_threadsafe/compat.toml`) with that evidence; any disagreement is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from mlx_threadsafe import registry, versions
from mlx_threadsafe.patches import ALL
from mlx_threadsafe.scenarios import Outcome, run_batch

from .venvs import CannotInstall, release_python

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))
EVIDENCE = os.path.join(HERE, "results", "evidence.json")

with open(os.path.join(HERE, "releases.toml"), "rb") as _source:
    RELEASES = tomllib.load(_source)
SCENARIOS_BY_PACKAGE: Dict[str, List[str]] = {package: list(table) for package, table in RELEASES["scenarios"].items()}
SCENARIO_PATCHES: Dict[str, List[str]] = {name: patches for table in RELEASES["scenarios"].values()
                                          for name, patches in table.items()}


@dataclass(frozen=True)
class Target:
    package: str
    release: str
    mlx: str

    @property
    def key(self) -> str:
        return f"{self.package}=={self.release}@mlx{self.mlx}"


def targets(requirements: Sequence[str], mlx_versions: Sequence[str]) -> List[Target]:
    found = []
    for requirement in requirements:
        package, _, release = requirement.partition("==")
        if package not in ("mlx-lm", "mlx-vlm") or not release:
            raise ValueError(f"give releases as mlx-lm==X or mlx-vlm==X, not {requirement!r}")
        found.extend(Target(package, release, mlx) for mlx in mlx_versions)
    return found


def every_release() -> List[str]:
    return [f"{package}=={release}" for package in ("mlx-lm", "mlx-vlm") for release in RELEASES[package]]


# How run_batch reports a scenario whose process crashed.
CRASHES = ("process died", "then the process exited")
# What a threading failure looks like; anything else failing the same way on both sides
# is the release not running on that mlx (e.g. version skew with transformers or mlx-lm).
THREAD_ERRORS = ("There is no Stream", "in current thread", "hung for") + CRASHES


def verdict(without: Dict[str, Any], with_shim: Dict[str, Any]) -> str:
    """fixed | not-needed | n/a | broken (the release cannot do this on this mlx, shim or not) | FAILS."""
    if not (without["applicable"] and with_shim["applicable"]):
        return "n/a"
    if with_shim["ok"]:
        return "not-needed" if without["ok"] else "fixed"
    same_failure = not without["ok"] and without["detail"] == with_shim["detail"]
    if same_failure and not any(mark in with_shim["detail"] for mark in THREAD_ERRORS):
        return "broken"
    return "FAILS"


def _applied_patches(python: str, package: str) -> List[str]:
    """The patches the shim put in place there, or will when their module (a server) is imported."""
    module = package.replace("-", "_")
    code = (f"import json, mlx.core, {module}, mlx_threadsafe; "
            "status = mlx_threadsafe.install(); "
            "print(json.dumps(status.ids('applied') + status.ids('pending-import')))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"could not read the shim's status: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_target(target: Target) -> Dict[str, Any]:
    record: Dict[str, Any] = {"package": target.package, "release": target.release, "mlx": target.mlx}
    scenarios = SCENARIOS_BY_PACKAGE[target.package]
    extra = ("mlx-lm",) if target.package == "mlx-lm" else ()
    try:
        python = release_python(f"{target.package}=={target.release}", mlx=target.mlx, extra=extra)
        applied = _applied_patches(python, target.package)
    except (CannotInstall, RuntimeError) as error:
        return dict(record, state="cannot-run", reason=str(error))
    without = run_batch(scenarios, shim=False, python=python, timeout=SCENARIO_TIMEOUT)
    with_shim = _rerun_crashes(run_batch(scenarios, shim=True, python=python, timeout=SCENARIO_TIMEOUT), python)
    results = {}
    for name in scenarios:
        sides = {side: {"ok": o.ok, "applicable": o.applicable, "detail": o.detail[:200]}
                 for side, o in (("without", without[name]), ("with", with_shim[name]))}
        results[name] = dict(sides, verdict=verdict(sides["without"], sides["with"]))
    return dict(record, state="ran", applied=applied, scenarios=results)


CRASH_RERUNS = 2
# A scenario takes seconds on the tiny models; one that runs this long is deadlocked
# (seen without the shim: 4 threads on one qwen2_vl with mlx 0.31.2).
SCENARIO_TIMEOUT = 120


def _rerun_crashes(outcomes: Dict[str, Outcome], python: str) -> Dict[str, Outcome]:
    """A scenario whose process crashed with the shim is run alone CRASH_RERUNS more times.

    The exit aborts the first sweep saw (2 of 12 runs on mlx 0.31.2, shim or not) were
    the join/thread_local-destructor race mlx.thread_cleanup now closes; a rare crash
    with many threads remains possible on an old release. One crash is kept as a failure
    only if a re-run crashes or fails too; otherwise the pass is recorded with the crash
    named.
    """
    settled = dict(outcomes)
    for name, outcome in outcomes.items():
        if outcome.ok or not any(mark in outcome.detail for mark in CRASHES):
            continue
        reruns = [run_batch([name], shim=True, python=python, timeout=SCENARIO_TIMEOUT)[name]
                  for _ in range(CRASH_RERUNS)]
        if all(rerun.ok for rerun in reruns):
            settled[name] = Outcome(name, True, f"{reruns[-1].detail} (passed {CRASH_RERUNS} re-runs after a "
                                                f"first run that {outcome.detail[:80]})", outcome.applicable)
    return settled


def run(targets_to_run: Sequence[Target], jobs: int = 2, progress=print,
        finished: Callable[[str, Dict[str, Any]], None] = lambda key, record: None) -> Dict[str, Dict[str, Any]]:
    """Run the targets `jobs` at a time; `finished(key, record)` hears of each as it ends."""
    records = {}
    with ThreadPoolExecutor(jobs) as pool:
        for target, record in zip(targets_to_run, pool.map(run_target, targets_to_run)):
            records[target.key] = record
            finished(target.key, record)
            progress(f"{target.key}: {summarize(record)}")
    return records


def summarize(record: Dict[str, Any]) -> str:
    if record["state"] != "ran":
        return f"cannot run ({record['reason'][:100]})"
    verdicts = [s["verdict"] for s in record["scenarios"].values()]
    return ", ".join(f"{verdicts.count(v)} {v}"
                     for v in ("fixed", "not-needed", "n/a", "broken", "FAILS") if v in verdicts)


# ------------------------------------------------------------------ evidence


def load_evidence(path: str = EVIDENCE) -> Dict[str, Dict[str, Any]]:
    """The committed evidence, each verdict judged again by the current `verdict` rule."""
    if not os.path.exists(path):
        return {}
    with open(path) as source:
        records = json.load(source)
    for record in records.values():
        for result in record.get("scenarios", {}).values():
            result["verdict"] = verdict(result["without"], result["with"])
    return records


def save_evidence(records: Dict[str, Dict[str, Any]], path: str = EVIDENCE) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as sink:
        json.dump(dict(sorted(records.items(), key=lambda item: _sort_key(item[1]))), sink, indent=1)
        sink.write("\n")


def _sort_key(record: Dict[str, Any]):
    from packaging.version import Version

    return (record["package"], Version(record["release"]), Version(record["mlx"]))


# ------------------------------------------------------------------ check


def planned_patches(record: Dict[str, Any], matrix=None) -> List[str]:
    """The patches the runtime matrix applies to this release and mlx (options aside)."""
    matrix = matrix if matrix is not None else registry.load_matrix()
    env = versions.Environment(mlx=record["mlx"], backend="cpu",
                               mlx_lm=record["release"] if record["package"] == "mlx-lm" else None,
                               mlx_vlm=record["release"] if record["package"] == "mlx-vlm" else None)
    return [p.id for p in ALL if p.package in ("mlx", record["package"]) and registry.plan(p, env, matrix).apply]


def unrun_mlx_patches(records: Dict[str, Dict[str, Any]], matrix=None) -> List[str]:
    """Each mlx release of releases.toml on which the matrix applies an mlx patch no record ran."""
    matrix = matrix if matrix is not None else registry.load_matrix()
    problems = []
    for mlx in RELEASES["mlx"] + RELEASES.get("mlx-other", []):
        ran = {patch for record in records.values() if record["mlx"] == mlx and record["state"] == "ran"
               for patch in record["applied"]}
        env = versions.Environment(mlx=mlx, mlx_lm=None, mlx_vlm=None, backend="cpu")
        for patch in ALL:
            if patch.package == "mlx" and registry.plan(patch, env, matrix).apply and patch.id not in ran:
                problems.append(f"mlx {mlx}: the matrix applies {patch.id}, but no evidence ran it on that mlx "
                                "(verify --representatives)")
    return problems


def check(records: Dict[str, Dict[str, Any]], matrix_text: Optional[str] = None) -> List[str]:
    """Every disagreement between the runtime matrix and the evidence, as sentences."""
    matrix = registry.load_matrix(matrix_text)
    return unrun_mlx_patches(records, matrix) + check_records(records, matrix)


def check_records(records: Dict[str, Dict[str, Any]], matrix=None) -> List[str]:
    """The disagreements each record shows by itself (the release and mlx it ran on)."""
    matrix = matrix if matrix is not None else registry.load_matrix()
    problems = []
    for key, record in records.items():
        if record["state"] != "ran":
            continue
        for name, result in record["scenarios"].items():
            if result["verdict"] == "FAILS":
                problems.append(f"{key}: {name} fails with the shim: {result['with']['detail']}")
        relevant = {p.id for p in ALL if p.package in ("mlx", record["package"])}
        planned = set(planned_patches(record, matrix))
        recorded = set(record["applied"]) & relevant
        for patch_id in sorted(planned - recorded):
            problems.append(f"{key}: the matrix applies {patch_id}, but the evidence never ran it there "
                            "(re-run verify for this release)")
        for patch_id in sorted(recorded - planned):
            needing = [name for name, result in record["scenarios"].items()
                       if result["verdict"] == "fixed" and patch_id in SCENARIO_PATCHES.get(name, [])]
            if needing:
                problems.append(f"{key}: the matrix drops {patch_id}, but {', '.join(needing)} fail without "
                                "the shim and pass with it applied")
            else:
                problems.append(f"{key}: the matrix drops {patch_id}, which the evidence ran with "
                                "(re-run verify for this release)")
    return problems
