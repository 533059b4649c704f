"""Run the scenarios on real releases, record the evidence, and hold the runtime matrix to it.

For each release and mlx pairing: a venv (uv), the scenarios without and then with the
shim (one process per side; a scenario that kills its process is re-run alone), and the
patches the shim applied there. `check()` then compares the runtime matrix
(`mlx_threadsafe/compat.toml`) with that evidence; any disagreement is a failure.

Where no venv can be made (a GPU machine without a package registry), `run_site_target`
runs a release installed with `pip install --no-deps --target SITES/<package>-<release>`
on this interpreter, that folder first on PYTHONPATH; its records name the backend in
their key (`...@mlx0.32.4+cuda`) and carry the device they ran on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from packaging.requirements import Requirement
from packaging.version import Version

from harness.evidence import load_records, save_records
from mlx_threadsafe import planning, versions
from mlx_threadsafe.patches import ALL
from mlx_threadsafe.scenarios import Outcome, run_batch

from .releases import HERE, RELEASES, SCENARIO_PATCHES, SCENARIOS_BY_PACKAGE
from .venvs import CannotInstall, release_python

EVIDENCE = os.path.join(HERE, "results", "evidence.json")


@dataclass(frozen=True)
class Target:
    package: str
    release: str
    mlx: str
    backend: str = "cpu"  # the mlx build: cpu (the venvs), cuda (a GPU machine's sites)

    @property
    def key(self) -> str:
        return record_key(self.package, self.release, self.mlx, self.backend)


def record_key(package: str, release: str, mlx: str, backend: str = "cpu") -> str:
    """The evidence key of a pair: CPU records as ever, others with the backend after a '+'."""
    key = f"{package}=={release}@mlx{mlx}"
    return key if backend == "cpu" else f"{key}+{backend}"


def backend_of(record: Dict[str, Any]) -> str:
    """The mlx build a record ran on (records without the field ran on the CPU build)."""
    return record.get("backend", "cpu")


def targets(requirements: Sequence[str], mlx_versions: Sequence[str], backend: str = "cpu") -> List[Target]:
    found: List[Target] = []
    for requirement in requirements:
        package, _, release = requirement.partition("==")
        if package not in ("mlx-lm", "mlx-vlm") or not release:
            raise ValueError(f"give releases as mlx-lm==X or mlx-vlm==X, not {requirement!r}")
        found.extend(Target(package, release, mlx, backend) for mlx in mlx_versions)
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


def pins_for(package: str, release: str) -> List[str]:
    """What `release` needs pinned to import next to today's packages (releases.toml [pins])."""
    found = []
    for requirement, pins in RELEASES.get("pins", {}).items():
        pinned = Requirement(requirement)
        if pinned.name == package and pinned.specifier.contains(release, prereleases=True):
            found.extend(pins)
    return found


def run_target(target: Target) -> Dict[str, Any]:
    record: Dict[str, Any] = {"package": target.package, "release": target.release, "mlx": target.mlx}
    pins = pins_for(target.package, target.release)
    if pins:
        record["pins"] = pins
    extra = (("mlx-lm",) if target.package == "mlx-lm" else ()) + tuple(pins)
    try:
        python = release_python(f"{target.package}=={target.release}", mlx=target.mlx, extra=extra)
        applied = _applied_patches(python, target.package)
    except (CannotInstall, RuntimeError) as error:
        return dict(record, state="cannot-run", reason=str(error))
    return dict(record, state="ran", applied=applied, scenarios=_run_scenarios(target.package, python))


def _run_scenarios(package: str, python: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Each scenario of the package without and with the shim (one process a side), judged."""
    scenarios = SCENARIOS_BY_PACKAGE[package]
    without = run_batch(scenarios, shim=False, python=python, timeout=SCENARIO_TIMEOUT, env=env)
    with_shim = _rerun_crashes(run_batch(scenarios, shim=True, python=python, timeout=SCENARIO_TIMEOUT, env=env),
                               python, env)
    results = {}
    for name in scenarios:
        sides = {side: {"ok": o.ok, "applicable": o.applicable, "detail": o.detail[:200]}
                 for side, o in (("without", without[name]), ("with", with_shim[name]))}
        results[name] = dict(sides, verdict=verdict(sides["without"], sides["with"]))
    return results


# ------------------------------------------------------------------ site dirs (no venv)

# What a site-dirs record lists of its environment: the packages the releases resolve
# differently from one machine to the next.
SITE_PACKAGES_SHOWN = ("mlx", "mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-lm", "mlx-vlm", "transformers",
                       "tokenizers", "huggingface_hub", "numpy", "wrapt")


def site_dir(sites: str, package: str, release: str) -> str:
    """Where `pip install --no-deps --target` put one release (and the pins it needs)."""
    return os.path.join(sites, f"{package}-{release}")


def site_env(site: str) -> Dict[str, str]:
    """The environment that puts `site` first on the path, before what PYTHONPATH already holds."""
    existing = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join([site] + ([existing] if existing else []))}


def _probe_site(python: str, package: str, env: Dict[str, str]) -> Dict[str, Any]:
    """In one process on the site: what is installed (metadata) and the patches the shim applied."""
    module = package.replace("-", "_")
    code = ("import json, sys; from importlib import metadata\n"
            f"import mlx.core, {module}, mlx_threadsafe\n"
            "from mlx_threadsafe import versions\n"
            "status = mlx_threadsafe.install(); found = versions.detect()\n"
            "def version(name):\n"
            "    try:\n        return metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n        return None\n"
            f"shown = {{name: version(name) for name in {list(SITE_PACKAGES_SHOWN)!r}}}\n"
            "print(json.dumps({'applied': status.ids('applied') + status.ids('pending-import'),"
            f" 'release': found.version_of({package!r}), 'mlx': found.mlx, 'backend': found.backend,"
            " 'python': sys.version.split()[0],"
            " 'packages': {name: v for name, v in shown.items() if v is not None}}))\n")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env))
    if done.returncode != 0:
        raise RuntimeError(f"could not read the shim's status: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_site_target(target: Target, sites: str, device: str, python: str = sys.executable) -> Dict[str, Any]:
    """One pair on a release installed in SITES/<package>-<release>, run by `python` (this one).

    mlx, this package and every dependency the site does not pin come from the existing
    PYTHONPATH and `python`'s own site-packages. The record names the backend, the device
    and the versions the scenarios saw; it is `cannot-run` if what is installed is not the
    pair asked for.
    """
    record: Dict[str, Any] = {"package": target.package, "release": target.release, "mlx": target.mlx}
    if target.backend != "cpu":
        record["backend"] = target.backend
    record["device"] = device
    site = site_dir(sites, target.package, target.release)
    if not os.path.isdir(site):
        return dict(record, state="cannot-run", reason=f"no site {site} (pip install --no-deps --target it)")
    env = site_env(site)
    try:
        probe = _probe_site(python, target.package, env)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
        return dict(record, state="cannot-run", reason=str(error))
    record["installed"] = dict(python=probe["python"], **probe["packages"])
    found = {"mlx": probe["mlx"], target.package: probe["release"], "backend": probe["backend"]}
    wanted = {"mlx": target.mlx, target.package: target.release, "backend": target.backend}
    if found != wanted:
        return dict(record, state="cannot-run", reason=f"the site gives {found}, not {wanted}")
    return dict(record, state="ran", applied=probe["applied"],
                scenarios=_run_scenarios(target.package, python, env))


def _run_quiet(command: List[str], timeout: float = 120) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _mlx_device(python: str) -> Dict[str, Any]:
    """What mlx itself says of its device, in a child (CUDA starts there, not here)."""
    code = ("import json, mlx.core as mx\n"
            "info = {'default': str(mx.default_device())}\n"
            "cuda = getattr(mx, 'cuda', None)\n"
            "info['cuda'] = bool(cuda.is_available()) if cuda is not None else False\n"
            "try:\n    info.update({k: str(v) for k, v in mx.device_info().items()})\n"
            "except Exception:\n    pass\n"
            "print(json.dumps(info))\n")
    lines = _run_quiet([python, "-c", code]).strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}


def describe_device(gpus: str, smi_header: str, mlx_info: Dict[str, Any], backend: str) -> str:
    """'NVIDIA H200, CUDA 13.0, driver 580.159.03' (GPU) or 'CPU, <name> (x86_64)', from what was read."""
    rows = [[cell.strip() for cell in line.split(",")] for line in gpus.strip().splitlines() if line.strip()]
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", smi_header)
    if rows and backend != "cpu":
        names = sorted({row[0] for row in rows})
        name = names[0] if len(rows) == 1 else f"{len(rows)} x {' / '.join(names)}"
        parts = [name]
        if cuda:
            parts.append(f"CUDA {cuda.group(1)}")
        if len(rows[0]) > 1:
            parts.append(f"driver {rows[0][1]}")
        return ", ".join(parts)
    name = mlx_info.get("device_name") or platform.processor() or "unknown"
    if backend != "cpu":  # no nvidia-smi: what mlx reports
        return f"{name} ({backend}{', CUDA ' + cuda.group(1) if cuda else ''})"
    return f"CPU, {name} ({mlx_info.get('architecture') or platform.machine()})"


def device_label(backend: str, python: str = sys.executable) -> str:
    """The device this machine runs mlx on, read from nvidia-smi and mlx itself."""
    smi = shutil.which("nvidia-smi")
    gpus = _run_quiet([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"]) if smi else ""
    header = _run_quiet([smi]) if smi else ""
    return describe_device(gpus, header, _mlx_device(python), backend)


CRASH_RERUNS = 2
# A scenario takes seconds on the tiny models; one that runs this long is deadlocked
# (seen without the shim: 4 threads on one qwen2_vl with mlx 0.31.2).
SCENARIO_TIMEOUT = 120


def _rerun_crashes(outcomes: Dict[str, Outcome], python: str,
                   env: Optional[Dict[str, str]] = None) -> Dict[str, Outcome]:
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
        reruns = [run_batch([name], shim=True, python=python, timeout=SCENARIO_TIMEOUT, env=env)[name]
                  for _ in range(CRASH_RERUNS)]
        if all(rerun.ok for rerun in reruns):
            settled[name] = Outcome(name, True, f"{reruns[-1].detail} (passed {CRASH_RERUNS} re-runs after a "
                                                f"first run that {outcome.detail[:80]})", outcome.applicable)
    return settled


def run(targets_to_run: Sequence[Target], jobs: int = 2, progress=print,
        finished: Callable[[str, Dict[str, Any]], None] = lambda key, record: None,
        run_one: Callable[[Target], Dict[str, Any]] = run_target) -> Dict[str, Dict[str, Any]]:
    """Run the targets `jobs` at a time; `finished(key, record)` hears of each as it ends."""
    records = {}
    with ThreadPoolExecutor(jobs) as pool:
        for target, record in zip(targets_to_run, pool.map(run_one, targets_to_run)):
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
    records = load_records(path)
    for record in records.values():
        for result in record.get("scenarios", {}).values():
            result["verdict"] = verdict(result["without"], result["with"])
    return records


def save_evidence(records: Dict[str, Dict[str, Any]], path: str = EVIDENCE) -> None:
    save_records(path, records, order=lambda _key, record: _sort_key(record))


def _sort_key(record: Dict[str, Any]):
    # CPU records first (the order they always had), then each other backend's.
    backend = backend_of(record)
    return (record["package"], Version(record["release"]), Version(record["mlx"]), backend != "cpu", backend)


def cpu_record(records: Dict[str, Dict[str, Any]], record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The CPU record of the same release and mlx as `record` (a GPU one), if the evidence has it."""
    found = records.get(record_key(record["package"], record["release"], record["mlx"]))
    return found if found is not None and backend_of(found) == "cpu" else None


def verdict_differences(record: Dict[str, Any], other: Dict[str, Any]) -> List[str]:
    """'scenario: other's verdict -> record's verdict' for each scenario the two judge differently."""
    if record["state"] != "ran" or other["state"] != "ran":
        return [] if record["state"] == other["state"] else [f"(all): {other['state']} -> {record['state']}"]
    mine, theirs = record["scenarios"], other["scenarios"]
    return [f"{name}: {theirs[name]['verdict'] if name in theirs else 'not run'} -> {mine[name]['verdict']}"
            for name in mine if name not in theirs or theirs[name]["verdict"] != mine[name]["verdict"]]


def merge_evidence(records: Dict[str, Dict[str, Any]], path: str) -> List[str]:
    """Merge the records saved in `path` (e.g. a GPU run's --out file) into `records`; their keys."""
    new = load_evidence(path)
    records.update(new)
    return list(new)


# ------------------------------------------------------------------ check


def planned_patches(record: Dict[str, Any], matrix=None) -> List[str]:
    """The patches the runtime matrix applies to this release and mlx (options aside)."""
    matrix = matrix if matrix is not None else planning.load_matrix()
    env = versions.Environment(mlx=record["mlx"], backend=backend_of(record),
                               mlx_lm=record["release"] if record["package"] == "mlx-lm" else None,
                               mlx_vlm=record["release"] if record["package"] == "mlx-vlm" else None)
    return [p.id for p in ALL if p.package in ("mlx", record["package"]) and planning.plan(p, env, matrix).apply]


def unrun_mlx_patches(records: Dict[str, Dict[str, Any]], matrix=None, cpu: bool = True) -> List[str]:
    """Each mlx release on which the matrix applies an mlx patch no record of that backend ran.

    For the CPU build (unless `cpu` is false: records of one GPU run alone): every mlx
    release of releases.toml. For another backend (GPU runs, never a given): every mlx
    release some record of that backend names.
    """
    matrix = matrix if matrix is not None else planning.load_matrix()
    problems = []
    for mlx in (RELEASES["mlx"] + RELEASES.get("mlx-other", [])) if cpu else []:
        problems += [f"mlx {mlx}: the matrix applies {patch_id}, but no evidence ran it on that mlx "
                     "(verify --representatives)" for patch_id in _unrun_on(records, "cpu", mlx, matrix)]
    others = sorted({(backend_of(r), r["mlx"]) for r in records.values() if backend_of(r) != "cpu"})
    for backend, mlx in others:
        problems += [f"mlx {mlx} ({backend}): the matrix applies {patch_id}, but no {backend} evidence ran it on "
                     "that mlx (compat_matrix/gpu_run.sh)" for patch_id in _unrun_on(records, backend, mlx, matrix)]
    return problems


def _unrun_on(records: Dict[str, Dict[str, Any]], backend: str, mlx: str, matrix) -> List[str]:
    ran = {patch for record in records.values()
           if record["mlx"] == mlx and backend_of(record) == backend and record["state"] == "ran"
           for patch in record["applied"]}
    env = versions.Environment(mlx=mlx, mlx_lm=None, mlx_vlm=None, backend=backend)
    return [patch.id for patch in ALL
            if patch.package == "mlx" and planning.plan(patch, env, matrix).apply and patch.id not in ran]


def check(records: Dict[str, Dict[str, Any]], matrix_text: Optional[str] = None) -> List[str]:
    """Every disagreement between the runtime matrix and the evidence, as sentences."""
    matrix = planning.load_matrix(matrix_text)
    return unrun_mlx_patches(records, matrix) + check_records(records, matrix)


def check_records(records: Dict[str, Dict[str, Any]], matrix=None) -> List[str]:
    """The disagreements each record shows by itself (the release and mlx it ran on)."""
    matrix = matrix if matrix is not None else planning.load_matrix()
    problems = []
    for key, record in records.items():
        if record["state"] != "ran":
            continue
        for name, result in record["scenarios"].items():
            if result["verdict"] == "FAILS":
                problems.append(f"{key}: {name} fails with the shim: {result['with']['detail']}")
        # An opt-in patch (the batch mode) passes every call through while its mode is off, as
        # in every scenario: the sweep neither needs nor shows it; its own tests cover it.
        relevant = {p.id for p in ALL if p.package in ("mlx", record["package"]) and not getattr(p, "opt_in", False)}
        planned = set(planned_patches(record, matrix)) & relevant
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
