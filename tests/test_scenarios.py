"""Each cross-thread failure on real MLX (CPU, mlx >= 0.32): fails without the shim, passes with it."""

import pytest

from mlx_threadsafe.scenarios import run_in_subprocess

FAIL_WITHOUT_SHIM = ["lazy_rope_on_worker", "adapter_on_worker", "threads_sample_differently"]
PASS_WITH_SHIM = FAIL_WITHOUT_SHIM + ["generate_on_worker", "asyncio_to_thread", "eight_threads_match_serial"]


@pytest.mark.parametrize("name", FAIL_WITHOUT_SHIM)
def test_fails_without_the_shim(name, tiny_models):
    outcome = run_in_subprocess(name, shim=False)
    assert not outcome.ok, outcome.detail


@pytest.mark.parametrize("name", PASS_WITH_SHIM)
def test_passes_with_the_shim(name, tiny_models):
    outcome = run_in_subprocess(name, shim=True)
    assert outcome.ok, outcome.detail


def test_the_off_thread_failures_are_the_stream_errors_users_search_for(tiny_models):
    outcome = run_in_subprocess("lazy_rope_on_worker", shim=False)
    assert "There is no Stream(cpu, 0) in current thread" in outcome.detail
