"""Each cross-thread failure on real MLX (CPU, mlx >= 0.32): fails without the shim, passes with it."""

import pytest
from helpers import failure_without_shim, outcome_with_shim, run_json

from mlx_threadsafe.scenarios import run_in_subprocess

FAIL_WITHOUT_SHIM = [
    "lazy_rope_on_worker",
    "adapter_on_worker",
    "threads_sample_differently",
    "batch_generator_handoff",
    "batch_generator_shared_by_2_threads",
    "batch_generator_shared_by_8_threads",
    "batch_generator_collected_on_foreign_thread",
    "module_stream_on_request_thread",
    "streams_held_anywhere_on_request_threads",
]
# The last two work without the shim: it must not break them.
PASS_WITH_SHIM = FAIL_WITHOUT_SHIM + ["generate_on_worker", "asyncio_to_thread", "eight_threads_match_serial",
                                      "batch_generate_caches_continue", "batch_generator_on_its_scheduler_thread"]


@pytest.mark.parametrize("name", FAIL_WITHOUT_SHIM)
def test_fails_without_the_shim(name, tiny_models):
    assert failure_without_shim(name) is not None


@pytest.mark.parametrize("name", PASS_WITH_SHIM)
def test_passes_with_the_shim(name, tiny_models):
    outcome = outcome_with_shim(name)
    assert outcome.ok, outcome.detail


def test_the_off_thread_failures_are_the_stream_errors_users_search_for(tiny_models):
    outcome = run_in_subprocess("lazy_rope_on_worker", shim=False)
    assert "There is no Stream(cpu, 0) in current thread" in outcome.detail, outcome.detail


def test_a_generator_owned_by_its_thread_refuses_other_threads_with_a_clear_error(tiny_models):
    out = run_json("""
        import importlib, json, mlx.core as mx, mlx_threadsafe
        mlx_threadsafe.install()
        from mlx_lm import load
        from mlx_threadsafe.testing import on_new_thread
        from mlx_threadsafe.testing import build_lm
        model, _ = load(str(build_lm("llama")))
        BatchGenerator = importlib.import_module("mlx_lm.generate").BatchGenerator
        generator = on_new_thread(lambda: BatchGenerator(model, max_tokens=4, stream=mx.default_stream(mx.cpu)))
        try:
            generator.insert([[1, 5, 6]])
            print(json.dumps("no error"))
        except RuntimeError as error:
            print(json.dumps([type(error).__name__, str(error)]))
    """)
    name, message = out
    assert name == "WrongThread"
    assert "belongs to thread 'on-new-thread-<lambda>'" in message and "MainThread" in message


def test_a_generator_built_on_a_worker_is_owned_by_that_worker(tiny_models):
    out = run_json("""
        import importlib, json, mlx_threadsafe
        mlx_threadsafe.install()
        from mlx_lm import load
        from mlx_threadsafe import Worker
        from mlx_threadsafe.testing import build_lm
        model, _ = load(str(build_lm("llama")))
        BatchGenerator = importlib.import_module("mlx_lm.generate").BatchGenerator
        with Worker("model-owner") as worker:
            generator = worker.call(lambda: BatchGenerator(model, max_tokens=4))
            owner = generator._mlx_threadsafe_owner
            print(json.dumps([owner.worker is worker, owner.dedicated, isinstance(generator, BatchGenerator)]))
    """)
    assert out == [True, False, True]
