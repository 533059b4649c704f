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
@pytest.mark.parametrize("server", ["mlx-openai-server", "vllm-mlx", "to-thread-app"])
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


# The shim adds nothing to a server's output (issue 26, item 3): each shimmed side's output
# is compared with the side without the shim, line by line after normalisation.

_WITHOUT = """\
2026-12-04 14:30:52 | INFO | Started server process [41231]
INFO:     Uvicorn running on http://127.0.0.1:18731 (Press CTRL+C to quit)
INFO:     127.0.0.1:50112 - "POST /v1/chat/completions HTTP/1.1" 200 OK
Request chatcmpl-3f9a1c0b7d2e finished in 0.41 s, 55.1 tokens/s, peak memory 0.042 GB
INFO:vllm_mlx.scheduler:[schedule] request=6cc6bb63-8cd uid=0 prompt_tokens=4 max_tokens=12 running=1 waiting=8
HF_HOME is /tmp/conformance-a1b2c3/hf
INFO:     Shutting down
"""

_WITH_TIMES_AND_PORTS_CHANGED = """\
2026-12-04 14:31:40 | INFO | Started server process [41388]
INFO:     Uvicorn running on http://127.0.0.1:18762 (Press CTRL+C to quit)
INFO:     127.0.0.1:50377 - "POST /v1/chat/completions HTTP/1.1" 200 OK
INFO:     127.0.0.1:50378 - "POST /v1/chat/completions HTTP/1.1" 200 OK
Request chatcmpl-88aa01cc34ef finished in 0.57 s, 41.9 tokens/s, peak memory 0.043 GB
INFO:vllm_mlx.scheduler:[schedule] request=d855e374-418 uid=3 prompt_tokens=4 max_tokens=12 running=2 waiting=5
HF_HOME is /tmp/conformance-z9y8x7/hf
INFO:     Shutting down
"""

_FUTURE_WARNING = ("/work/main/mlx_threadsafe/patches/mlx/module_streams.py:93: FutureWarning: "
                   "torch.distributed.reduce_op is deprecated, please use torch.distributed.ReduceOp instead")


def _compared(without: str, with_shim: str, port_without: int = 18731, port_with: int = 18762):
    from conformance import servers

    baselines = {("default", "llama"): (servers.normalise_output(
        without.splitlines(), port=port_without, home="/tmp/conformance-a1b2c3"), "the none side")}
    record = {"side": "run", "ok": True, "answered": 9, "requests": 9, "equal_to_reference": 9,
              "cached_tokens": 39, "shim_applied": ["mlx.thread_rng"]}
    normalised = servers.normalise_output(with_shim.splitlines(), port=port_with, home="/tmp/conformance-z9y8x7")
    servers.compare_with_baseline(record, normalised, baselines, None, "default", "llama",
                                  {"llama": "/models/llama"}, none_ran=True)
    return record


def test_output_that_differs_only_in_timestamps_pids_ports_ids_and_figures_passes():
    # Also vllm-mlx's scheduler line: another request id and uid, other queue depths.
    record = _compared(_WITHOUT, _WITH_TIMES_AND_PORTS_CHANGED)
    # The access-log line repeats (a set difference: how often a per-request line repeats is scheduling).
    assert record["shim_only_lines"] == [] and record["ok"], record
    assert record["output_compared_with"] == "the none side"


def test_a_line_only_the_shimmed_output_has_fails_the_side_and_check():
    from conformance import servers

    with_warning = _WITH_TIMES_AND_PORTS_CHANGED.replace(
        "INFO:     Uvicorn", _FUTURE_WARNING + "\n  _ = getattr(module, name)\nINFO:     Uvicorn")
    record = _compared(_WITHOUT, with_warning)
    assert not record["ok"]
    assert record["shim_only_lines"] == [_FUTURE_WARNING, "  _ = getattr(module, name)"], record
    assert "2 output lines only with the shim" in servers.summary(record)
    assert "FutureWarning" in servers.summary(record)
    full = dict(record, kind="server", target="x", version="1", mode="default", model="llama", status="fail")
    problems, _ = evidence.check({"server/x==1/default/llama/run": full})
    assert problems and "only with the shim" in problems[0], problems
    assert "only with the shim" in evidence.table({"server/x==1/default/llama/run": full})


def test_the_shim_debug_log_is_no_output_line():
    # With MLX_THREADSAFE_LOG_FILE the debug log goes to a file; were it printed, each line would count.
    record = _compared(_WITHOUT, _WITH_TIMES_AND_PORTS_CHANGED + "mlx_threadsafe: applied mlx.thread_rng\n")
    assert record["shim_only_lines"] == ["mlx_threadsafe: applied mlx.thread_rng"] and not record["ok"]


# The unchanged FastAPI app on asyncio.to_thread (issue 30): the `batch` side and the throughput
# probe. Wiring only, with fakes: the real run is `python -m conformance run --servers to-thread-app`.

def test_the_fast_subset_and_the_default_sides_of_the_third_party_servers_are_unchanged():
    from conformance import __main__ as cli
    from conformance import servers

    assert cli.FAST["servers"] == ["vllm-mlx"] and cli.FAST["sides"] == ["none", "run"], cli.FAST
    assert servers.SERVERS["vllm-mlx"].sides == servers.SERVERS["mlx-openai-server"].sides == ("none", "run", "env")
    app = servers.SERVERS["to-thread-app"]
    assert app.sides == ("none", "run", "env", "batch") and app.throughput and not app.prompt_cache
    argv = app.command("/venv/bin", "/models/llama", 18777)
    assert argv[:2] == ["/venv/bin/python", servers.APPS_TO_THREAD] and argv[-2:] == ["--port", "18777"]
    with open(servers.APPS_TO_THREAD) as source:
        code = source.read()
    imports = [line for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "mlx_threadsafe" in line], imports  # a user's app, unchanged
    assert "asyncio.to_thread(generate," in code


def test_each_side_sets_the_shim_switches_and_nothing_leaks_in_from_the_caller():
    from conformance import servers

    outer = {"PATH": "/bin", "MLX_THREADSAFE": "1", "MLX_THREADSAFE_BATCH": "1", "PYTHONPATH": "/x"}
    switches = {side: {k: v for k, v in servers.side_environment(outer, side).items() if k.startswith("MLX")}
                for side in servers.SIDES}
    assert switches == {"none": {}, "run": {}, "env": {"MLX_THREADSAFE": "1"},
                        "batch": {"MLX_THREADSAFE": "1", "MLX_THREADSAFE_BATCH": "1"}}
    assert "PYTHONPATH" not in servers.side_environment(outer, "batch")


def test_the_throughput_probe_counts_completion_tokens_and_compares_each_answer_with_its_serial_one():
    from conformance import servers

    calls = []

    def fake_chat(port, model, messages, stream, max_tokens):
        calls.append((messages[0]["content"], stream, max_tokens))
        return {"text": "answer to " + messages[0]["content"], "usage": {"completion_tokens": max_tokens}}

    record = {"failures": []}
    probe = servers.measure_throughput(1, "tiny", record, chat=fake_chat)
    n, bursts = servers.THROUGHPUT_REQUESTS, servers.THROUGHPUT_BURSTS
    assert len(calls) == n * (bursts + 2)  # serial, warm-up, measured bursts
    assert {(stream, tokens) for _, stream, tokens in calls} == {(False, servers.THROUGHPUT_TOKENS)}
    assert probe["answered"] == probe["equal_to_serial"] == n * bursts and not record["failures"]
    assert probe["burst_completion_tokens"] == [n * servers.THROUGHPUT_TOKENS] * bursts
    assert len(probe["burst_tokens_per_s"]) == bursts and probe["tokens_per_s"] > 0


def _app_record(side, rate, ok=True):
    return {"kind": "server", "target": "to-thread-app", "version": "1", "mode": "default", "model": "llama",
            "side": side, "ok": ok, "status": "pass" if ok else "fail", "requests": 9, "answered": 9,
            "equal_to_reference": 9, "cached_tokens": None, "cache_check": "not applicable: no prompt cache",
            "failures": [], "bad_output": [], "shim_applied": [] if side == "none" else ["mlx.thread_rng"],
            "shim_only_lines": [],
            "throughput": {"requests": 8, "max_tokens": 48, "bursts": 7, "tokens_per_s": rate,
                           "serial_tokens_per_s": 300.0, "answered": 56, "equal_to_serial": 56}}


def test_the_table_shows_the_batch_side_and_its_throughput_against_env_and_none():
    records = {f"server/to-thread-app==1/default/llama/{side}": _app_record(side, rate)
               for side, rate in (("none", 400.0), ("env", 500.0), ("batch", 1000.0))}
    problems, _ = evidence.check(records)
    assert not problems, problems
    text = evidence.table(records)
    assert "`batch`: **pass**" in text and "no prompt cache" in text and "1000 tok/s" in text
    assert "| to-thread-app | 1 | default, llama | 400 | 500 | 1000 | 2.00x | 2.50x | 300 |" in text, text
    # A failing batch side fails check; a table without any batch record shows no batch line.
    records["server/to-thread-app==1/default/llama/batch"] = _app_record("batch", None, ok=False)
    problems, _ = evidence.check(records)
    assert problems and "batch" in problems[0]
    assert "`batch`" not in evidence.table({k: v for k, v in records.items() if not k.endswith("/batch")}
                                           ).split("## Throughput")[0].split("| server / suite")[1]
