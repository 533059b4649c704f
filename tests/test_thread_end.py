"""Threads that used MLX end cleanly, and draw distinct, reproducible random numbers."""

import os

import pytest
from helpers import run_json

EXIT_SCRIPT = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_script.py")).read()


def exit_codes(shim: bool, runs: int):
    import subprocess
    import sys

    from helpers import ROOT

    codes = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, "shim" if shim else "plain"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        codes.append((done.returncode, "terminate called" in done.stderr))
    return codes


def test_threads_that_generated_end_without_aborting_the_process(tiny_models):
    with_shim = exit_codes(shim=True, runs=20)
    assert with_shim == [(0, False)] * 20


@pytest.mark.slow
def test_two_hundred_exits_with_the_shim_abort_zero_times_and_some_without(tiny_models):
    without = exit_codes(shim=False, runs=200)
    with_shim = exit_codes(shim=True, runs=200)
    aborts_without = sum(1 for code, terminated in without if code != 0 or terminated)
    print(f"aborts: without the shim {aborts_without}/200, with the shim 0/200")
    assert aborts_without > 0
    assert with_shim == [(0, False)] * 200


SLOW_OS_TEARDOWN = """
import ctypes, sys, threading, time
if sys.argv[1] == "shim":
    import mlx_threadsafe
    mlx_threadsafe.install()
import mlx.core as mx

libc = ctypes.CDLL(None)


class SlowFinalization:
    sleep = staticmethod(time.sleep)

    def __del__(self):  # runs while the interpreter finalizes, and lets other threads in
        self.sleep(0.5)


slow_finalization = SlowFinalization()


double = mx.compile(lambda x: x * 2)


def draw():
    if sys.argv[2] == "draw":
        mx.eval(mx.random.uniform(shape=(4,)))
    else:  # what an old mlx-lm generate_step does for a short prompt: async_eval and item() only
        y = double(mx.ones(4))
        mx.async_eval(y)
        y.sum().item()
    # A thread_local destructor registered after MLX's runs before them (reverse
    # order): this OS thread lingers 0.1 s after join() returned, as on a loaded machine.
    libc.__cxa_thread_atexit_impl(libc.usleep, ctypes.c_void_p(100_000), None)


thread = threading.Thread(target=draw)
thread.start()
thread.join()
"""


# A thread adopted at its first draw, and one whose MLX calls the shim never sees (watched
# from its start). On mlx 0.31.2 the compiled function alone does not abort without the shim.
@pytest.mark.parametrize("mlx_version, work", [
    ("installed", "draw"), ("installed", "compiled_async_eval_item"),
    pytest.param("0.31.2", "draw", marks=pytest.mark.release)])
def test_a_thread_whose_os_teardown_outlives_join_does_not_abort_the_exit(mlx_version, work):
    # join() returns before the OS thread runs MLX's thread_local destructors; the random
    # key's destructor takes the GIL, which aborts the process if finalization has begun.
    # The script widens that window on purpose, so the race is lost every time.
    import subprocess
    import sys

    from helpers import ROOT
    from releases import release_python

    python = sys.executable if mlx_version == "installed" else release_python("mlx-lm==0.26.4", mlx=mlx_version)

    def run(mode):
        return subprocess.run([python, "-c", SLOW_OS_TEARDOWN, mode, work], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    without = run("plain")
    assert without.returncode != 0 and "terminate called" in without.stderr, (without.returncode, without.stderr)
    with_shim = run("shim")
    assert with_shim.returncode == 0, with_shim.stderr


SEEDED = """
import json, threading, mlx_threadsafe
mlx_threadsafe.install()
from mlx_lm import load, generate
from mlx_lm.sample_utils import make_sampler
from mlx_threadsafe.testing import build_lm, PROMPT
model, tokenizer = load(str(build_lm("llama")))
mlx_threadsafe.seed(1234)
outputs = {}
def sample(name):
    outputs[name] = generate(model, tokenizer, PROMPT, max_tokens=10, sampler=make_sampler(temp=1.0))
for name in ("a", "b"):
    thread = threading.Thread(target=sample, args=(name,), name=f"sampler-{name}")
    thread.start(); thread.join()
print(json.dumps(outputs))
"""


def test_the_same_seed_gives_the_same_per_thread_outputs_across_runs(tiny_models):
    first, second = run_json(SEEDED), run_json(SEEDED)
    assert first == second
    assert first["a"] != first["b"]


def test_an_explicit_seed_on_a_thread_is_kept(tiny_models):
    out = run_json("""
        import json, threading, mlx.core as mx, mlx_threadsafe
        mlx_threadsafe.install()
        results = []
        def draw():
            mx.random.seed(7)
            results.append(mx.random.uniform(shape=(3,)).tolist())
        for _ in range(2):
            t = threading.Thread(target=draw); t.start(); t.join()
        print(json.dumps(results))
    """)
    assert out[0] == out[1]


def test_threads_named_anew_each_time_keep_the_per_name_counts_bounded_and_still_draw_differently():
    # A server that names every request's thread anew (Thread-N) must not grow the shim's
    # per-name counts without bound; past the bound the counting starts over.
    out = run_json("""
        import json, threading, mlx.core as mx, mlx_threadsafe
        from mlx_threadsafe import streams
        mlx_threadsafe.install()
        streams._NAMES_KEPT = 50
        draws, sizes = [], []
        def draw():
            draws.append(mx.random.uniform(shape=(2,)).tolist())
            sizes.append(len(streams._names_seen))
        for index in range(120):
            thread = threading.Thread(target=draw, name=f"request-{index}")
            thread.start(); thread.join()
        print(json.dumps([max(sizes), len({tuple(d) for d in draws})]))
    """)
    assert out == [50, 120]
