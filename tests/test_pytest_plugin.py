"""The pytest plugin, through pytester: each run is a fresh pytest process (the shim is global state)."""

import os
import sys

from helpers import ROOT

GENERATE_ON_WORKER = """
    import pytest
    from mlx_lm import generate

    def test_generates_on_the_worker(mlx_tiny_model, mlx_worker, mlx_on_new_thread):
        tiny = mlx_tiny_model("llama")
        on_main = generate(tiny.model, tiny.tokenizer, "w1 w2", max_tokens=4)
        assert mlx_worker.call(generate, tiny.model, tiny.tokenizer, "w1 w2", max_tokens=4) == on_main
        assert mlx_on_new_thread(generate, tiny.model, tiny.tokenizer, "w1 w2", max_tokens=4) == on_main
"""

SEES_INSTALLED = """
    import mlx_threadsafe, pytest

    def test_installed(mlx_threadsafe_status):
        assert mlx_threadsafe.is_installed() and mlx_threadsafe_status.installed
"""


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=600)


def test_inactive_by_default_nothing_is_patched_and_markers_are_registered(pytester):
    pytester.makepyfile("""
        import sys, mlx_threadsafe, pytest

        @pytest.mark.mlx_cross_thread
        def test_not_installed():
            assert not mlx_threadsafe.is_installed()
            assert "mlx_lm" not in sys.modules and "mlx.core" not in sys.modules
    """)
    result = run(pytester, "--strict-markers")
    result.assert_outcomes(passed=1)
    assert "mlx_threadsafe patches" not in result.stdout.str()


def test_on_for_the_run_by_option_with_the_patches_in_the_header(pytester):
    pytester.makepyfile(SEES_INSTALLED)
    result = run(pytester, "--mlx-threadsafe")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["mlx_threadsafe 0.*: mlx *", "mlx_threadsafe patches: *mlx.thread_cleanup*"])


def test_on_for_the_run_by_ini_option(pytester):
    pytester.makeini("[pytest]\nmlx_threadsafe = true\n")
    pytester.makepyfile(SEES_INSTALLED)
    run(pytester).assert_outcomes(passed=1)


def test_marker_installs_for_one_test_and_uninstalls_after(pytester):
    pytester.makepyfile("""
        import mlx_threadsafe, pytest

        @pytest.mark.mlx_threadsafe
        def test_a_marked():
            assert mlx_threadsafe.is_installed()

        def test_b_unmarked_after():
            assert not mlx_threadsafe.is_installed()
    """)
    run(pytester, "-p", "no:randomly").assert_outcomes(passed=2)


def test_fixtures_give_a_model_a_worker_and_a_fresh_thread(pytester):
    pytester.makepyfile(GENERATE_ON_WORKER)
    run(pytester, "--mlx-threadsafe").assert_outcomes(passed=1)


def test_cross_thread_marker_catches_code_that_only_works_on_the_importing_thread(pytester):
    pytester.makepyfile("""
        import mlx.core as mx
        import pytest

        STREAM = mx.new_stream(mx.cpu)  # made at import, on the main thread

        def uses_module_stream():
            with mx.stream(STREAM):
                return (mx.ones(3) * 2).sum().item()

        def test_on_main_thread():
            assert uses_module_stream() == 6

        @pytest.mark.mlx_cross_thread
        def test_on_a_fresh_thread():
            assert uses_module_stream() == 6
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*There is no Stream(cpu, *) in current thread*"])


def test_a_test_stuck_on_a_worker_fails_with_every_threads_stack(pytester):
    pytester.makepyfile("""
        import threading

        def test_stuck(mlx_worker):
            mlx_worker.submit(threading.Event().wait)  # never returns
            mlx_worker.call(lambda: None)              # queued behind it
    """)
    result = run(pytester, "--mlx-threadsafe-timeout", "2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*timed out after 2s*", "*--- thread mlx-worker[[]test_stuck[]]*", "*in wait*"])


def test_runs_under_xdist_with_workers_building_one_model_at_once(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_THREADSAFE_MODEL_CACHE", str(tmp_path / "fresh-cache"))
    pytester.makepyfile(test_one=GENERATE_ON_WORKER, test_two=GENERATE_ON_WORKER, test_three=SEES_INSTALLED)
    result = run(pytester, "-n", "2", "--mlx-threadsafe")
    result.assert_outcomes(passed=3)
    built = [p for p in os.listdir(tmp_path / "fresh-cache") if not p.startswith(".")]
    assert len(built) == 1, built


def test_the_downstream_example_project_passes_under_xdist():
    import subprocess

    example = os.path.join(ROOT, "examples", "downstream")
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider"], cwd=example,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "mlx_threadsafe patches:" in done.stdout
