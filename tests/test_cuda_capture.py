"""mlx.cuda_graph_capture (issue 29): the wiring, on the CPU.

The abort it prevents needs a GPU: its rates (aborts per run, without and with the shim)
are the evidence in benchmarks/cuda_capture/ (RESULTS.md, rates.json, cost.json). Here,
in fresh interpreters: on the CPU backend the patch is skipped with its reason and the
environment is untouched; with the backend reported as CUDA it is opt-in
(MLX_THREADSAFE_CUDA_GRAPHS=off), sets MLX_USE_CUDA_GRAPHS=0 only then, leaves a value the
program set, and uninstall restores the environment; the rate harness counts runs as it
should.
"""

import json

import pytest
from helpers import AS_CUDA, run_json, run_python

from mlx_threadsafe.patches import ALL, by_id

PATCH_ID = "mlx.cuda_graph_capture"


PROBE = """
    import json, os
    {prelude}
    import mlx_threadsafe
    steps = []
    def row():
        r = mlx_threadsafe.status()[{patch_id!r}]
        return [str(r.state), r.reason, os.environ.get("MLX_USE_CUDA_GRAPHS")]
    for step in {steps!r}:
        if step == "install":
            mlx_threadsafe.install(only=[{patch_id!r}])
        elif step == "uninstall":
            mlx_threadsafe.uninstall()
        else:
            import mlx.core
        steps.append(row())
    print(json.dumps(steps))
"""


def _probe(steps, cuda: bool, env=None):
    code = PROBE.format(prelude=AS_CUDA if cuda else "", patch_id=PATCH_ID, steps=steps)
    clean = {"MLX_THREADSAFE_CUDA_GRAPHS": "", "MLX_THREADSAFE": ""}
    return run_json(code, env=dict(clean, **(env or {})))


def _without_graph_variable(monkeypatch):
    monkeypatch.delenv("MLX_USE_CUDA_GRAPHS", raising=False)


def test_registered_with_its_module_and_matrix_row():
    patch = by_id(PATCH_ID)
    assert patch in ALL and patch.trigger == "mlx.core" and patch.package == "mlx"
    from importlib import resources

    import tomllib

    matrix = tomllib.loads(resources.files("mlx_threadsafe").joinpath("compat.toml").read_text())
    assert any(PATCH_ID in row["patches"] for row in matrix["mlx"]["rows"])


def test_on_the_cpu_backend_it_is_skipped_and_changes_nothing(monkeypatch):
    _without_graph_variable(monkeypatch)
    state, reason, variable = _probe(["install", "import"], cuda=False, env={"MLX_THREADSAFE_CUDA_GRAPHS": "off"})[-1]
    assert state == "skipped"
    assert "only on the cuda backend" in reason and "cpu" in reason
    assert variable is None


@pytest.mark.parametrize("steps", [["install", "import"], ["import", "install"]])
def test_on_cuda_without_opt_in_it_is_skipped_and_graphs_stay_on(monkeypatch, steps):
    _without_graph_variable(monkeypatch)
    state, reason, variable = _probe(steps, cuda=True)[-1]
    assert state == "skipped" and "opt-in" in reason and "MLX_THREADSAFE_CUDA_GRAPHS=off" in reason
    assert variable is None


@pytest.mark.parametrize("steps", [["install", "import"], ["import", "install"],
                                   ["install", "import", "install"]])
def test_on_cuda_opted_in_it_turns_graphs_off_before_mlx_reads_it(monkeypatch, steps):
    _without_graph_variable(monkeypatch)
    rows = _probe(steps, cuda=True, env={"MLX_THREADSAFE_CUDA_GRAPHS": "off"})
    state, reason, variable = rows[-1]
    assert state == "applied", reason
    assert variable == "0"
    if steps[0] == "install":
        assert rows[0][0].startswith("pending")  # applies when mlx.core is imported: before any GPU work


def test_uninstall_restores_the_environment(monkeypatch):
    _without_graph_variable(monkeypatch)
    rows = _probe(["install", "import", "uninstall", "uninstall"], cuda=True,
                  env={"MLX_THREADSAFE_CUDA_GRAPHS": "off"})
    assert rows[1][2] == "0"
    assert rows[2] == ["not-installed", "install() not called", None]
    assert rows[3][2] is None


def test_a_value_the_program_set_is_left_alone():
    rows = _probe(["install", "import", "uninstall"], cuda=True,
                  env={"MLX_THREADSAFE_CUDA_GRAPHS": "off", "MLX_USE_CUDA_GRAPHS": "1"})
    assert rows[1][0] == "applied" and rows[1][2] == "1"
    assert rows[2][2] == "1"


def test_the_rate_harness_counts_aborts_by_cause():
    from benchmarks.cuda_capture.run import _summarize

    capture = ["terminate called after throwing an instance of 'std::runtime_error'",
               "  what():  cudaStreamEndCapture(stream, &handle_) failed: operation failed due to a "
               "previous error during capture"]
    runs = [
        {"config": "no_shim", "rc": 0, "signal": None, "capture_error": False, "ok": True,
         "threads_agree": True, "text": "a", "stderr_tail": []},
        {"config": "no_shim", "rc": -6, "signal": 6, "capture_error": True, "ok": False,
         "threads_agree": False, "text": None, "stderr_tail": capture},
        {"config": "no_shim", "rc": -8, "signal": 8, "capture_error": False, "ok": False,
         "threads_agree": False, "text": None, "stderr_tail": []},
        {"config": "no_shim", "rc": 0, "signal": None, "capture_error": False, "ok": True,
         "threads_agree": False, "text": "b", "stderr_tail": []},
    ]
    results = {"runs": runs}
    _summarize(results)
    s = results["summary"]["no_shim"]
    assert (s["runs"], s["aborts"], s["capture_aborts"], s["ok"], s["other_failures"]) == (4, 2, 1, 1, 1)
    assert s["signals"] == {"6": 1, "8": 1} and s["other_abort_messages"] == {"(no stderr)": 1}
    json.dumps(results)


# ---------------------------------------------------------------- mlx.cuda_capture_gate (default on CUDA)
# The abort needs a GPU (rates: benchmarks/cuda_capture/); here the gate's wiring on the CPU backend
# reported as CUDA: threads generate the reference text through it, a thread's end excludes encoding
# until its OS thread is gone, and uninstall gives MLX's own functions back.

GATE = """
    import json, threading, time
    {prelude}
    import mlx_threadsafe
    mlx_threadsafe.install()
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_threadsafe.patches.mlx import cuda_capture_gate
    from mlx_threadsafe.testing import PROMPT, build_lm
    state = str(mlx_threadsafe.status()["mlx.cuda_capture_gate"].state)
    path = str(build_lm("qwen3"))
    model, tokenizer = load(path)
    reference = generate(model, tokenizer, PROMPT, max_tokens=8)
    texts = [None] * 8
    def work(i):
        m, t = load(path)
        texts[i] = generate(m, t, PROMPT, max_tokens=8)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    # A thread that released its streams leaves the gate closed to encoding until its OS thread is gone.
    gate, release, ids = cuda_capture_gate._gate, threading.Event(), []
    ending = threading.Thread(target=lambda: (ids.append(threading.get_native_id()), release.wait()))
    ending.start()
    while not ids: time.sleep(0.01)
    gate.enter_exclusive(); gate.leave_exclusive(ending_native_id=ids[0])
    closed_while_alive = gate._still_ending()
    release.set(); ending.join()
    began = time.monotonic()
    gate.run_shared(lambda: None, ())  # returns once the OS thread is gone
    closed = closed_while_alive and not gate._still_ending() and time.monotonic() - began < 5
    mx.clear_cache()
    wrapped = hasattr(mx.async_eval, "__wrapped__")
    mlx_threadsafe.uninstall()
    print(json.dumps([state, texts == [reference] * 8, closed, wrapped, hasattr(mx.async_eval, "__wrapped__")]))
"""


def test_capture_gate_serves_threads_the_reference_text_and_closes_while_a_thread_ends():
    state, all_equal, closed, wrapped, still_wrapped = run_json(GATE.format(prelude=AS_CUDA), timeout=300)
    assert state == "applied" and all_equal and closed and wrapped and not still_wrapped


def test_capture_gate_lets_an_ending_thread_evaluate_its_end_steps():
    # A BatchGenerator handed to another thread evaluates its state as its first owner ends; that
    # thread's release of its streams (exclusive) must come after, or it waits for its own end.
    code = AS_CUDA + """
    import sys
    from mlx_threadsafe.scenarios.runner import main
    sys.exit(main(["batch_generator_handoff", "--shim"]))
    """
    done = run_python(code, timeout=120)
    assert done.returncode == 0 and '"ok": true' in done.stdout, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("disabled", [False, True])
def test_capture_gate_is_on_by_default_on_cuda_and_off_when_disabled(disabled):
    code = AS_CUDA + """
    import json, mlx_threadsafe
    mlx_threadsafe.install()
    import mlx.core as mx
    r = mlx_threadsafe.status()['mlx.cuda_capture_gate']
    print(json.dumps([str(r.state), hasattr(mx.async_eval, '__wrapped__')]))
    """
    state, wrapped = run_json(code, env={"MLX_THREADSAFE_DISABLE": "mlx.cuda_capture_gate"} if disabled else {})
    assert (state == "applied" and wrapped) if not disabled else (state != "applied" and not wrapped)


def test_capture_gate_is_skipped_on_the_cpu_backend():
    code = "import json, mlx_threadsafe; mlx_threadsafe.install(); import mlx.core as mx; " \
           "r = mlx_threadsafe.status()['mlx.cuda_capture_gate']; print(json.dumps([str(r.state), r.reason, " \
           "hasattr(mx.async_eval, '__wrapped__')]))"
    state, reason, wrapped = run_json(code)
    assert state == "skipped" and "cuda" in reason.lower() and not wrapped


def test_capture_gate_never_lets_a_shared_holder_in_while_a_thread_holds_it_exclusively():
    # The shared side takes no lock (a holder registers, then reads whether the gate is closed):
    # 8 threads entering it in a loop (and again from inside) and 2 taking it exclusively, for 2 s,
    # never overlap.
    code = """
    import json, threading, time
    from mlx_threadsafe.patches.mlx.cuda_capture_gate import Gate
    gate, lock = Gate(), threading.Lock()
    state = {"shared": 0, "exclusive": 0, "overlaps": 0, "shared_entries": 0, "exclusive_entries": 0}
    stop = time.monotonic() + 2
    def shared():
        while time.monotonic() < stop:
            gate.run_shared(inside, ())
    def inside():
        with lock:
            state["shared"] += 1; state["shared_entries"] += 1
            state["overlaps"] += bool(state["exclusive"])
        gate.run_shared(lambda: None, ())  # re-entered (Python code an evaluation ran): no wait, still inside
        with lock:
            state["overlaps"] += bool(state["exclusive"])
            state["shared"] -= 1
    def exclusive():
        while time.monotonic() < stop:
            gate.enter_exclusive()
            with lock:
                state["exclusive"] += 1; state["exclusive_entries"] += 1
                state["overlaps"] += bool(state["shared"] or state["exclusive"] > 1)
            time.sleep(0.0001)
            with lock:
                state["exclusive"] -= 1
            gate.leave_exclusive()
            time.sleep(0.001)
    threads = [threading.Thread(target=shared) for _ in range(8)]
    threads += [threading.Thread(target=exclusive) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(dict(state, open=not gate._closed and not gate._holders)))
    """
    out = run_json(code, timeout=60)
    assert out["overlaps"] == 0 and out["open"], out
    assert out["shared_entries"] > 1000 and out["exclusive_entries"] > 50, out
