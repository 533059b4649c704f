"""The conformance harness (conformance/): programs nobody here wrote, without and with the shim.

The fast subset runs for real (venvs made with `uv`, like the release tests); the committed
evidence must pass `python -m conformance check`.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from conformance import evidence


def _conformance(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MLX_THREADSAFE", None)
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_committed_evidence_passes_check():
    records = evidence.load()
    assert records, "conformance/results/evidence.json holds no records"
    problems, _ = evidence.check(records)
    assert not problems, "\n".join(problems)
    done = _conformance("check", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_on_a_server_that_fails_with_the_shim_and_on_an_upstream_regression(tmp_path):
    records = {
        "server/x==1/default/llama/run": {"kind": "server", "target": "x", "version": "1", "mode": "default",
                                          "model": "llama", "side": "run", "ok": False, "status": "fail",
                                          "requests": 9, "answered": 0, "equal_to_reference": 0,
                                          "cached_tokens": None, "failures": ["server: boom"]},
        "suite/y==2": {"kind": "suite", "target": "y", "version": "2", "status": "fail",
                       "regressions": [{"id": "test_a::test_b", "message": "There is no Stream"}],
                       "sides": {"none": {"passed": 1, "failed": 0, "skipped": 0},
                                 "env": {"passed": 0, "failed": 1, "skipped": 0}}},
    }
    path = tmp_path / "evidence.json"
    evidence.save(records, str(path))
    problems, _ = evidence.check(evidence.load(str(path)))
    assert len(problems) == 2 and "fails with the shim" in problems[0] and "test_a::test_b" in problems[1]
    done = _conformance("check", "--evidence", str(path), timeout=120)
    assert done.returncode == 1 and "FAILS" in done.stdout
    assert "| x | 1 | default, llama |" in evidence.table(records)


@pytest.mark.release
def test_the_fast_subset_runs_for_real(tmp_path):
    path = tmp_path / "evidence.json"
    done = _conformance("run", "--fast", "--evidence", str(path))
    assert path.exists(), done.stdout + done.stderr
    records = json.loads(path.read_text())["records"]
    servers = {k: r for k, r in records.items() if r["kind"] == "server"}
    assert {r["side"] for r in servers.values()} == {"none", "run"}, sorted(records)
    for key, record in servers.items():
        assert record.get("status") != "cannot-run", f"{key}: {record.get('reason')}"
        assert record["answered"] == record["requests"] == 9, (key, record.get("failures"))
    shim = next(r for r in servers.values() if r["side"] == "run")
    assert shim["ok"] and shim["shim_applied"], shim
    suites = [r for r in records.values() if r["kind"] == "suite"]
    assert suites and suites[0].get("status") != "cannot-run", suites
    assert sum(suites[0]["sides"]["none"][k] for k in ("passed", "failed", "skipped")) > 0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.release
@pytest.mark.slow
@pytest.mark.parametrize("server", ["mlx-openai-server", "vllm-mlx"])
def test_every_mode_of_the_server_passes_with_the_shim(tmp_path, server):
    path = tmp_path / "evidence.json"
    done = _conformance("run", "--servers", server, "--evidence", str(path), timeout=3000)
    records = json.loads(path.read_text())["records"]
    failing = [f"{k}: {r.get('reason') or r.get('failures') or r.get('bad_output')}"
               for k, r in records.items() if r["side"] != "none" and not r.get("ok")]
    assert not failing, "\n".join(failing)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.release
@pytest.mark.slow
@pytest.mark.parametrize("suite", ["mlx-lm==0.32.2", "mlx-lm==0.31.1"])
def test_no_upstream_test_passes_without_the_shim_and_fails_with_it(tmp_path, suite):
    path = tmp_path / "evidence.json"
    _conformance("run", "--suites", suite, "--evidence", str(path), timeout=7200)
    (record,) = json.loads(path.read_text())["records"].values()
    assert record["status"] != "cannot-run", record.get("reason")
    assert not record["regressions"], record["regressions"]
