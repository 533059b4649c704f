"""Upstream test suites, run without and with the shim (`MLX_THREADSAFE=1`), offline.

The tests come from the release's source distribution on PyPI (`pip download
--no-binary :all: --no-deps`), and run against the installed release (not the sdist's
source: pytest runs from the tests folder), next to mlx for the CPU and this package
editable. Both sides run with HF_HUB_OFFLINE=1 and an empty HF_HOME, so a test that
needs the model hub fails on both alike: it is listed as not runnable, never counted.

Per test (pytest `--junitxml`): a test that passes without the shim and fails with it is
a regression (re-run once on both sides, to tell a flaky test from a real one); a test
that fails without and passes with it is fixed by the shim.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from harness.evidence import today

from . import venvs

SRC = os.path.join(venvs.CONFORMANCE_VENVS, "src")
PER_TEST_TIMEOUT = 300
SUITE_TIMEOUT = 3600
HUB_MARKS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "offline mode", "HF_HUB_OFFLINE",
             "huggingface.co", "cached snapshot", "RepositoryNotFoundError", "outgoing traffic has been disabled",
             "couldn't connect", "Cannot find the requested files in the", "GatedRepoError",
             "does not appear to have a file named", "is not a local folder and is not a valid model identifier")


@dataclass
class Suite:
    target: str
    version: str
    extras: str = ""
    selection: List[str] = field(default_factory=list)  # test files / node ids, relative to the tests folder
    cpu_torch: bool = True  # mlx-lm[test] pulls lm-eval, which pulls torch
    note: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.target}{self.extras}=={self.version}"

    @property
    def venv(self) -> str:
        return f"suite-{self.target}-{self.version}" + ("-test" if self.extras else "")


SUITES: Dict[str, Suite] = {
    "mlx-lm==0.32.2": Suite("mlx-lm", "0.32.2", extras="[test]"),
    "mlx-lm==0.31.1": Suite("mlx-lm", "0.31.1", extras="[test]"),
    "mlx-vlm==0.7.10": Suite("mlx-vlm", "0.7.10"),
    # The CI subset: tests that need no model hub, among them one that samples on another
    # thread; without the test extras (lm-eval would bring torch).
    "mlx-lm==0.32.2:fast": Suite("mlx-lm", "0.32.2", cpu_torch=False,
                                 selection=["test_sample_utils.py", "test_tool_parsing.py", "test_chat.py"]),
}
FAST_SUITE = "mlx-lm==0.32.2:fast"


def _pip(python: str) -> List[str]:
    return [python, "-m", "pip"]


def fetch_tests(suite: Suite, python: str) -> str:
    """The tests folder of the release's sdist (downloaded once); raises RuntimeError if it has none."""
    root = os.path.join(SRC, f"{suite.target}-{suite.version}")
    if not os.path.isdir(root):
        os.makedirs(SRC, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=SRC) as scratch:
            done = subprocess.run(_pip(python) + ["download", "-q", "--no-binary", ":all:", "--no-deps",
                                                  f"{suite.target}=={suite.version}", "-d", scratch],
                                  capture_output=True, text=True, timeout=600)
            archives = glob.glob(os.path.join(scratch, "*.tar.gz"))
            if done.returncode != 0 or not archives:
                raise RuntimeError(f"pip download of the sdist failed: {done.stderr.strip()[-300:]}")
            with tarfile.open(archives[0]) as archive:
                archive.extractall(os.path.join(scratch, "x"), filter="data")
            (top,) = glob.glob(os.path.join(scratch, "x", "*"))
            os.rename(top, root)
    for candidate in ("tests", os.path.join(suite.target.replace("-", "_"), "tests")):
        if os.path.isdir(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    raise RuntimeError(f"the sdist of {suite.target} {suite.version} on PyPI ships no tests "
                       f"(nor does its wheel); its test suite lives only in the git repository")


def _outcomes(junit: str) -> Dict[str, Tuple[str, str]]:
    """{test id: (outcome, message)} from a junit xml file."""
    out: Dict[str, Tuple[str, str]] = {}
    if not os.path.exists(junit):
        return out
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = ((child.get("message") or "") + "\n" + (child.text or ""))
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        out[test] = (outcome, message)
    return out


def _node_id(test: str) -> str:
    """'test_generate.TestGenerate::test_x' -> 'test_generate.py::TestGenerate::test_x'."""
    classname, name = test.split("::", 1)
    parts = classname.split(".")
    cut = next((i for i, part in enumerate(parts) if part[:1].isupper()), len(parts))
    return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])


def _pytest(python: str, tests: str, selection: List[str], shim: bool, junit: str, timeout: float) -> Dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in ("MLX_THREADSAFE", "MLX_THREADSAFE_DISABLE", "PYTHONPATH", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    if shim:
        env["MLX_THREADSAFE"] = "1"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conformance-hf-") as home:
        env["HF_HOME"] = home
        command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", f"--junitxml={junit}",
                   f"--timeout={PER_TEST_TIMEOUT}", "--rootdir", tests, *(selection or ["."])]
        process = subprocess.Popen(command, cwd=tests, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            code: Optional[int] = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            code = None
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the tests left behind
        except (ProcessLookupError, PermissionError):
            pass
    return {"exit_code": code, "seconds": round(time.monotonic() - started, 1),
            "tail": "\n".join(output.splitlines()[-6:])}


def _counts(outcomes: Dict[str, Tuple[str, str]]) -> Dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome, _ in outcomes.values():
        counts["failed" if outcome == "error" else outcome] += 1
    return counts


def _hub(message: str) -> bool:
    return any(mark in message for mark in HUB_MARKS)


def run_suite(name: str, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    suite = SUITES[name]
    record: Dict[str, Any] = {"kind": "suite", "target": suite.target, "version": suite.version,
                              "selection": " ".join(suite.selection) or "all", "when": today()}
    try:
        python = venvs.target_python(suite.venv, [suite.requirement, "pytest", "pytest-timeout", "pip"],
                                     cpu_torch=suite.cpu_torch)
        tests = fetch_tests(suite, python)
    except (venvs.CannotInstall, RuntimeError, subprocess.SubprocessError) as error:
        return dict(record, status="cannot-run", reason=f"{error}"[:600])
    record["versions"] = venvs.versions_in(python, [suite.target, "mlx", "mlx-lm", "transformers", "torch"])
    results: Dict[str, Dict[str, Tuple[str, str]]] = {}
    record["sides"] = {}
    with tempfile.TemporaryDirectory(prefix="conformance-junit-") as scratch:
        for side, shim in (("none", False), ("env", True)):
            junit = os.path.join(scratch, f"{side}.xml")
            run = _pytest(python, tests, suite.selection, shim, junit, SUITE_TIMEOUT)
            results[side] = _outcomes(junit)
            record["sides"][side] = dict(run, **_counts(results[side]))
            progress(f"suite/{name} [{side}]: {record['sides'][side]['passed']} passed, "
                     f"{record['sides'][side]['failed']} failed, {record['sides'][side]['skipped']} skipped "
                     f"in {run['seconds']}s (exit {run['exit_code']})")
        none, env = results["none"], results["env"]
        suspects = [t for t in none if none[t][0] == "passed" and env.get(t, ("missing", ""))[0] in ("failed", "error")]
        flaky = []
        if suspects:  # once more on both sides: a flaky test is not a regression
            ids = [_node_id(t) for t in suspects]
            again = {}
            for side, shim in (("none", False), ("env", True)):
                junit = os.path.join(scratch, f"{side}-again.xml")
                _pytest(python, tests, ids, shim, junit, SUITE_TIMEOUT)
                again[side] = _outcomes(junit)
            for test in list(suspects):
                if again["env"].get(test, ("missing", ""))[0] == "passed" or \
                        again["none"].get(test, ("missing", ""))[0] != "passed":
                    suspects.remove(test)
                    flaky.append(test)
    record["regressions"] = [{"id": t, "message": env[t][1].strip()[:600]} for t in sorted(suspects)]
    record["flaky"] = sorted(flaky)
    record["fixed"] = [{"id": t, "message_without": none[t][1].strip()[:400]} for t in sorted(none)
                       if none[t][0] in ("failed", "error") and env.get(t, ("", ""))[0] == "passed"]
    record["not_runnable"] = sorted(t for t in none if none[t][0] in ("failed", "error")
                                    and env.get(t, ("", ""))[0] in ("failed", "error")
                                    and (_hub(none[t][1]) or _hub(env[t][1])))
    record["fail_both"] = {t: none[t][1].strip().splitlines()[0][:200] if none[t][1].strip() else ""
                           for t in sorted(none) if none[t][0] in ("failed", "error")
                           and env.get(t, ("", ""))[0] in ("failed", "error") and t not in record["not_runnable"]}
    record["outcomes"] = {t: f"{none.get(t, ('missing', ''))[0]}/{env.get(t, ('missing', ''))[0]}"
                          for t in sorted(set(none) | set(env))}
    record["status"] = "fail" if record["regressions"] else "pass"
    return record


def run(names: Optional[List[str]] = None, progress: Callable[[str], None] = print,
        finished: Callable[[str, Dict[str, Any]], None] = lambda key, record: None) -> None:
    for name in names or [n for n in SUITES if n != FAST_SUITE]:
        record = run_suite(name, progress)
        key = f"suite/{name}"
        if record.get("status") == "cannot-run":
            progress(f"{key}: cannot run: {record['reason'][:200]}")
        else:
            progress(f"{key}: {record['status']}: {len(record['regressions'])} regressions, "
                     f"{len(record['fixed'])} fixed by the shim, {len(record['not_runnable'])} not runnable offline, "
                     f"{len(record['fail_both'])} failing on both sides")
        finished(key, record)
