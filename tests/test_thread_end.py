"""Threads that used MLX end cleanly, and draw distinct, reproducible random numbers."""

import os

import pytest

from conftest import run_json, run_python

EXIT_SCRIPT = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_script.py")).read()


def exit_codes(shim: bool, runs: int):
    import subprocess
    import sys

    from conftest import ROOT

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
