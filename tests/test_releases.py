"""Threaded generation on real mlx-lm releases, each in its own virtual environment.

mlx 0.32.4 on the CPU binds streams to threads, like Metal and CUDA from 0.31.2. Up to
mlx-lm 0.31.2 the module `generation_stream` is made at import on the importing
thread, so every off-thread generation fails without the shim.
"""

import pytest
from helpers import EXIT_CRASH, assert_fixed_by_shim, failure_without_shim, outcome_with_shim, run_json
from releases import release_python

from mlx_threadsafe.scenarios import run_in_subprocess

MODULE_STREAM_RELEASES = [
    pytest.param("mlx-lm==0.28.4", marks=pytest.mark.release),
    pytest.param("mlx-lm==0.30.7", marks=pytest.mark.release),
    pytest.param("mlx-lm==0.31.1", marks=pytest.mark.release),
]
THREAD_LOCAL_RELEASES = [pytest.param("mlx-lm==0.31.3", marks=pytest.mark.release)]
THREADED_SCENARIOS = ["generate_on_worker", "asyncio_to_thread", "eight_threads_match_serial"]


@pytest.mark.parametrize("release", MODULE_STREAM_RELEASES)
@pytest.mark.parametrize("name", THREADED_SCENARIOS)
def test_threaded_generation_fails_without_the_shim_and_passes_with_it(release, name):
    assert_fixed_by_shim(name, release_python(release), "There is no Stream(cpu, 0) in current thread")


@pytest.mark.parametrize("release", THREAD_LOCAL_RELEASES)
@pytest.mark.parametrize("name", THREADED_SCENARIOS + ["lazy_rope_on_worker", "adapter_on_worker"])
def test_thread_local_releases_pass_with_the_shim(release, name):
    outcome = run_in_subprocess(name, shim=True, python=release_python(release))
    assert outcome.ok, outcome.detail


BATCH_SCENARIOS = ["batch_generator_handoff", "batch_generator_shared_by_2_threads",
                   "batch_generator_shared_by_8_threads"]


@pytest.mark.parametrize("release", THREAD_LOCAL_RELEASES)
@pytest.mark.parametrize("name", BATCH_SCENARIOS)
def test_batch_generator_sharing_fails_without_the_shim_and_passes_with_it(release, name):
    python = release_python(release)
    assert failure_without_shim(name, python) is not None
    outcome = outcome_with_shim(name, python)
    assert outcome.ok, outcome.detail


@pytest.mark.parametrize("release", [pytest.param("mlx-lm==0.28.4", marks=pytest.mark.release),
                                     pytest.param("mlx-lm==0.31.1", marks=pytest.mark.release)])
def test_batch_generator_hand_off_on_module_stream_releases(release):
    python = release_python(release)
    assert not run_in_subprocess("batch_generator_handoff", shim=False, python=python).ok
    outcome = run_in_subprocess("batch_generator_handoff", shim=True, python=python)
    assert outcome.ok, outcome.detail


@pytest.mark.parametrize("release", THREAD_LOCAL_RELEASES)
def test_lazy_rope_fails_without_the_shim_on_thread_local_releases(release):
    outcome = run_in_subprocess("lazy_rope_on_worker", shim=False, python=release_python(release))
    assert not outcome.ok and "There is no Stream" in outcome.detail


@pytest.mark.release
def test_stream_patch_repoints_server_copy_and_reverts_every_binding():
    """0.31.1 keeps a name-imported copy in mlx_lm.server; install after importing it."""
    out = run_json("""
        import importlib, json, threading
        import mlx.core as mx, mlx_lm, mlx_lm.server, mlx_threadsafe
        gen = importlib.import_module("mlx_lm.generate")
        original = gen.generation_stream
        status = mlx_threadsafe.install()
        patched = [type(gen.generation_stream).__name__, mlx_lm.server.generation_stream is gen.generation_stream]
        mlx_threadsafe.uninstall()
        restored = [gen.generation_stream is original, mlx_lm.server.generation_stream is original]
        print(json.dumps([status["mlx_lm.generation_stream"].state, patched, restored]))
    """, python=release_python("mlx-lm==0.31.1"))
    assert out == ["applied", ["ThreadLocalStream", True], [True, True]]


@pytest.mark.release
def test_a_copy_the_shim_cannot_repoint_is_named_in_a_warning():
    out = run_json("""
        import importlib, json, warnings
        import mlx_lm, mlx_threadsafe
        class Holder: pass
        holder = Holder()
        holder.stream = importlib.import_module("mlx_lm.generate").generation_stream
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mlx_threadsafe.install()
        print(json.dumps([str(w.message) for w in caught]))
    """, python=release_python("mlx-lm==0.31.1"))
    assert any("could not be repointed" in m and "__main__.Holder" in m for m in out), out


@pytest.mark.release
@pytest.mark.parametrize("name", ["lazy_rope_on_worker", "batch_generator_handoff"])
def test_the_shim_works_with_wrapt_1(name):
    python = release_python("wrapt<2")
    version = run_json("import json, wrapt; print(json.dumps(wrapt.__version__))", python=python)
    assert version.startswith("1.")
    outcome = run_in_subprocess(name, shim=True, python=python)
    assert outcome.ok, outcome.detail


@pytest.mark.release
def test_threads_sharing_one_tokenizer_get_their_own_text_on_releases_with_one_detokenizer():
    # mlx-lm up to 0.27.1 hands one streaming detokenizer to every stream_generate.
    python = release_python("mlx-lm==0.26.4")
    only_streams = run_in_subprocess("eight_threads_match_serial", shim=True, python=python,
                                     env={"MLX_THREADSAFE_DISABLE": "mlx_lm.TokenizerWrapper.detokenizer"})
    assert not only_streams.ok and "!= serial" in only_streams.detail, only_streams.detail
    outcome = run_in_subprocess("eight_threads_match_serial", shim=True, python=python)
    assert outcome.ok, outcome.detail


@pytest.mark.release
def test_a_thread_that_samples_before_it_first_evaluates_gets_its_own_key():
    # mlx-lm 0.26.4 samples the first token of a short prompt while still building the
    # graph; on mlx 0.31.2 every new thread starts from the same key.
    python = release_python("mlx-lm==0.26.4", mlx="0.31.2")
    assert_fixed_by_shim("threads_sample_differently", python, "same text")


@pytest.mark.release
@pytest.mark.parametrize("name", ["generate_on_worker", "lazy_rope_on_worker"])
def test_the_oldest_release_fails_without_the_shim_and_passes_with_it(name):
    # mlx-lm 0.20.1 keeps its stream in mlx_lm/utils.py; the harness lets its Metal-only
    # wired_limit run on Linux in both runs.
    python = release_python("mlx-lm==0.20.1")
    assert_fixed_by_shim(name, python, "There is no Stream")


# ------------------------------------------------ compiled samplers on mlx 0.31.2 - 0.32.0


@pytest.mark.release
def test_a_sampler_compiled_at_import_is_frozen_off_the_import_thread_without_the_shim():
    # mlx-lm #1675: mx.compile captured the importing thread's random key.
    python = release_python("mlx-lm==0.26.4", mlx="0.31.2")
    assert_fixed_by_shim("compiled_sampler_advances_on_worker", python, "on all 8 calls")


SAMPLERS_INSTALLED_AFTER_IMPORT = """
    import json, threading
    import mlx.core as mx
    import mlx_lm.sample_utils as sample_utils
    from mlx_lm.sample_utils import categorical_sampling as copied
    import mlx_threadsafe

    originals = [sample_utils.categorical_sampling]  # in a list: install repoints module globals
    make_sampler = sample_utils.make_sampler
    status = mlx_threadsafe.install()
    sampler = make_sampler(temp=1.0)
    flat = mx.zeros((1, 1000))
    mx.eval(flat)
    draws = []
    worker = threading.Thread(target=lambda: draws.extend(sampler(flat).item() for _ in range(8)))
    worker.start(); worker.join()
    patched = [status["mlx.compile.random_state"].state, len(set(draws)) > 1,
               copied is not originals[0] and copied is sample_utils.categorical_sampling,
               sample_utils.make_sampler is make_sampler]
    mlx_threadsafe.uninstall()
    restored = [sample_utils.categorical_sampling is originals[0], copied is originals[0]]
    print(json.dumps([patched, restored]))
"""


@pytest.mark.release
def test_samplers_compiled_before_install_are_compiled_again_and_restored_by_uninstall():
    out = run_json(SAMPLERS_INSTALLED_AFTER_IMPORT, python=release_python("mlx-lm==0.26.4", mlx="0.31.2"))
    assert out == [["applied", True, True, True], [True, True]]


@pytest.mark.release
def test_a_compiled_function_capturing_the_key_among_other_state_updates_both_per_thread():
    out = run_json("""
        import json, threading
        from functools import partial
        import mlx.core as mx, mlx_threadsafe
        mlx_threadsafe.install()
        counter = {"steps": mx.array(0)}
        state = [counter, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step():
            counter["steps"] = counter["steps"] + 1
            return mx.random.randint(0, 1000, shape=(1,))

        draws = []
        def work():
            draws.extend(step().item() for _ in range(6))
        worker = threading.Thread(target=work); worker.start(); worker.join()
        print(json.dumps([len(set(draws)), counter["steps"].item()]))
    """, python=release_python("mlx-lm==0.26.4", mlx="0.31.2"))
    distinct, steps = out
    assert distinct > 1 and steps == 6, out


@pytest.mark.release
def test_a_key_captured_beside_a_plain_array_is_left_compiled_as_it_was_with_a_warning():
    # Per-thread copies of that list would take the array's updates away from the caller.
    out = run_json("""
        import json, warnings
        from functools import partial
        import mlx.core as mx, mlx_threadsafe
        mlx_threadsafe.install()
        state = [mx.array(0), mx.random.state]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            @partial(mx.compile, inputs=state, outputs=state)
            def step():
                state[0] = state[0] + 1
                return mx.random.randint(0, 1000, shape=(1,))

        step(); step()
        print(json.dumps([type(step).__name__, state[0].item(), [str(w.message) for w in caught]]))
    """, python=release_python("mlx-lm==0.26.4", mlx="0.31.2"))
    kind, steps, messages = out
    assert kind != "CompiledPerThread" and steps == 2, out
    assert any("step captures mx.random.state in a list beside other values" in m for m in messages), messages


@pytest.mark.release
def test_on_mlx_0_32_1_the_sampler_needs_the_compile_patch_beside_per_thread_seeding():
    """mlx 0.32.1 resolves a captured random state per thread, yet under mlx.thread_rng alone the
    sampler froze (the thread is seeded while it traces the sampler): the evidence that keeps
    mlx.compile.random_state on up to mlx 0.32.3."""
    python = release_python("mlx-lm==0.20.1", mlx="0.32.1")
    name = "compiled_sampler_advances_on_worker"
    without = run_in_subprocess(name, shim=False, python=python)
    # The sampler advanced; without the shim MLX may then abort at exit (what thread_cleanup fixes).
    assert without.ok or EXIT_CRASH in without.detail, without.detail
    without_the_patch = run_in_subprocess(name, shim=True, python=python,
                                          env={"MLX_THREADSAFE_DISABLE": "mlx.compile.random_state"})
    assert not without_the_patch.ok and "on all 8 calls" in without_the_patch.detail, without_the_patch.detail
    outcome = outcome_with_shim(name, python)
    assert outcome.ok, outcome.detail
