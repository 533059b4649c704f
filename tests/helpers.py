"""What the tests share: fresh interpreters, and the fails-without / passes-with check.

Imported as `helpers` (pytest's `pythonpath` setting puts tests/ and the root on the path).
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, python: str = sys.executable, env=None, timeout: float = 300):
    """Run `code` in a fresh interpreter; returns the CompletedProcess."""
    child_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=child_env, cwd=ROOT)


EXIT_ABORT = "terminate called without an active exception"


def run_json(code: str, exit_abort_allowed: bool = False, **kwargs):
    """Run `code`, which prints one JSON line last; returns the decoded value.

    `exit_abort_allowed`: for runs without the shim, where MLX may abort at exit after
    the program printed its answer (the abort `mlx.thread_cleanup` fixes).
    """
    done = run_python(code, **kwargs)
    aborted_at_exit = done.returncode == -6 and EXIT_ABORT in done.stderr and done.stdout.strip()
    assert done.returncode == 0 or (exit_abort_allowed and aborted_at_exit), \
        f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# Data races: without the shim they crash or corrupt most runs, not every run.
RACE_SCENARIOS = {"batch_generator_shared_by_2_threads", "batch_generator_shared_by_8_threads"}


def assert_fixed_by_shim(name: str, python: str, failure_mark: str) -> None:
    """Scenario `name` fails without the shim (its detail names `failure_mark`) and passes with it."""
    from mlx_threadsafe.scenarios import run_in_subprocess

    without = run_in_subprocess(name, shim=False, python=python)
    assert not without.ok and failure_mark in without.detail, without.detail
    outcome = outcome_with_shim(name, python)
    assert outcome.ok, outcome.detail


def failure_without_shim(name: str, python: str = None, tries: int = 3):
    """The first failing outcome without the shim (a race gets `tries` runs), or None."""
    from mlx_threadsafe.scenarios import run_in_subprocess

    for _ in range(tries if name in RACE_SCENARIOS else 1):
        outcome = run_in_subprocess(name, shim=False, python=python)
        if not outcome.ok:
            return outcome
    return None


# How a scenario reports an abort after it passed (the exit abort, common without the shim).
EXIT_CRASH = "passed, then the process exited"


def outcome_with_shim(name: str, python: str = None):
    """The scenario's outcome with the shim, run once: an exit crash fails the test.

    No retry: benchmarks/abort_rates.md counts 0 exit aborts with the shim in 1,000 thread_end
    and 500 batch_generator_shared runs (771 and 317 without it).
    """
    from mlx_threadsafe.scenarios import run_in_subprocess

    return run_in_subprocess(name, shim=True, python=python)


# A program prelude that reports the CUDA backend before install() plans (the only check of the
# hardware the CUDA patches make), for testing their wiring on the CPU.
AS_CUDA = """
    from mlx_threadsafe import versions
    real = versions.detect()
    versions.detect = lambda: versions.Environment(real.mlx, real.mlx_lm, real.mlx_vlm, "cuda")
"""
