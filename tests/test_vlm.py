"""mlx-vlm on real MLX (CPU, mlx 0.32.4): tiny offline VLMs, each case without and with the shim.

Every release runs in its own virtual environment (made with uv): the test extras do not
install mlx-vlm itself.
"""

import pytest
from helpers import assert_fixed_by_shim, failure_without_shim, run_json
from releases import release_python

from mlx_threadsafe.scenarios import run_batch, run_in_subprocess

# Fail without the shim on mlx-vlm 0.7.10 and pass with it.
FIXED_ON_NEWEST = [
    "vlm_batch_generator_handoff",
    "vlm_batch_generator_shared_by_2_threads",
    "vlm_batch_generator_collected_on_foreign_thread",
    "vlm_qwen2_vl_concurrent_requests_match_serial",
    "vlm_qwen2_vl_interleaved_requests_keep_their_positions",
    "vlm_qwen2_vl_raw_forwards_prefill_then_decode_elsewhere",
]
# Pass either way on 0.7.10 (kept green with the shim's wrappers in the path).
WORK_WITH_SHIM = ["vlm_generate_on_worker", "vlm_qwen2_vl_forward_on_worker",
                  "vlm_qwen2_vl_prefill_then_decode_elsewhere"]


def newest():
    return release_python("mlx-vlm==0.7.10", extra=())


@pytest.mark.parametrize("name", FIXED_ON_NEWEST)
def test_fails_without_the_shim(name):
    failure = failure_without_shim(name, newest(), tries=3 if "shared" in name else 1)
    assert failure is not None, f"{name} passed without the shim"


def test_every_vlm_scenario_passes_with_the_shim():
    outcomes = run_batch(FIXED_ON_NEWEST + WORK_WITH_SHIM, shim=True, python=newest())
    failed = {name: o.detail for name, o in outcomes.items() if not (o.ok and o.applicable)}
    assert failed == {}


def test_a_generator_collected_elsewhere_restores_the_wired_limit_silently():
    outcome = run_in_subprocess("vlm_batch_generator_collected_on_foreign_thread", shim=True, python=newest())
    assert outcome.ok and "wired limit restored" in outcome.detail, outcome.detail
    without = run_in_subprocess("vlm_batch_generator_collected_on_foreign_thread", shim=False, python=newest())
    assert "There is no Stream(Device(gpu, 0)" in without.detail, without.detail


def test_uninstall_restores_the_vlm_targets_exactly():
    out = run_json("""
        import importlib, json, mlx.core as mx, mlx_vlm, mlx_threadsafe
        ar, dispatch, package = (importlib.import_module(m) for m in
                                 ("mlx_vlm.generate.ar", "mlx_vlm.generate.dispatch", "mlx_vlm.generate"))
        def snapshot():
            cls = ar.BatchGenerator
            return {"ar.generate_step": ar.generate_step, "dispatch.generate_step": dispatch.generate_step,
                    "generate.generate_step": package.generate_step, "ar.wired_limit": ar.wired_limit,
                    "BatchGenerator.__init__": vars(cls)["__init__"], "BatchGenerator.next": vars(cls)["next"],
                    "BatchGenerator.close": vars(cls)["close"], "BatchGenerator.__del__": vars(cls)["__del__"],
                    "mx.random.categorical": mx.random.categorical}
        before = snapshot()
        mlx_threadsafe.install()
        during = snapshot()
        mlx_threadsafe.uninstall()
        after = snapshot()
        print(json.dumps([sorted(k for k in before if during[k] is before[k]),
                          sorted(k for k in before if after[k] is not before[k])]))
    """, python=newest())
    unchanged_while_installed, not_restored = out
    assert unchanged_while_installed == []
    assert not_restored == []


def test_models_without_request_state_pass_straight_through():
    out = run_json("""
        import importlib, json, mlx_threadsafe
        mlx_threadsafe.install()
        from mlx_vlm import load
        from mlx_threadsafe.testing import build_vlm
        model, _ = load(str(build_vlm("gemma3")))
        ar = importlib.import_module("mlx_vlm.generate.ar")
        import mlx.core as mx
        steps = ar.generate_step(mx.array([[2, 5, 6]]), model, None, None)
        print(json.dumps(type(steps).__name__ + ":" + steps.__name__))
    """, python=newest())
    assert out == "generator:generate_step"


@pytest.mark.release
def test_mlx_vlm_0_4_4_generates_on_a_worker_with_the_shim():
    # mlx-vlm 0.4.4 makes its generation stream at import (mlx-vlm #1049, #1134).
    python = release_python("mlx-vlm==0.4.4", extra=())
    names = ["vlm_generate_on_worker", "vlm_qwen2_vl_forward_on_worker",
             "vlm_qwen2_vl_concurrent_requests_match_serial"]
    without = run_batch(names, shim=False, python=python)
    assert "There is no Stream(cpu, 0) in current thread" in without["vlm_generate_on_worker"].detail
    assert all(not o.ok for o in without.values()), {n: o.detail for n, o in without.items()}
    with_shim = run_batch(names, shim=True, python=python)
    assert all(o.ok for o in with_shim.values()), {n: o.detail for n, o in with_shim.items()}


@pytest.mark.release
def test_mlx_vlm_0_4_4_batch_generator_hands_off_between_threads_with_the_shim():
    # Before 0.5.0 next() takes the batch's embeddings; the owner patch hops it all the same.
    assert_fixed_by_shim("vlm_batch_generator_handoff", release_python("mlx-vlm==0.4.4", extra=()),
                         "There is no Stream")


@pytest.mark.release
def test_mlx_vlm_0_6_1_lazy_rotary_tables_batch_generator_and_request_state():
    # 0.6.1: qwen2_vl rotary tables lazy after load; BatchGenerator with insert(prompt_kwargs=).
    python = release_python("mlx-vlm==0.6.1", extra=())
    names = ["vlm_qwen2_vl_forward_on_worker", "vlm_batch_generator_handoff",
             "vlm_qwen2_vl_concurrent_requests_match_serial", "vlm_batch_generator_collected_on_foreign_thread",
             "vlm_qwen2_vl_interleaved_requests_keep_their_positions"]
    without = run_batch(names, shim=False, python=python)
    assert all(not o.ok for o in without.values()), {n: o.detail for n, o in without.items()}
    with_shim = run_batch(names, shim=True, python=python)
    assert all(o.ok and o.applicable for o in with_shim.values()), {n: o.detail for n, o in with_shim.items()}


@pytest.mark.release
def test_interleaved_requests_overwrite_each_others_positions_even_without_thread_bound_streams():
    # mlx-vlm #1415 on mlx 0.31.2 (CPU streams not yet thread-bound): a plain data race.
    python = release_python("mlx-vlm==0.6.1", mlx="0.31.2", extra=())
    assert_fixed_by_shim("vlm_qwen2_vl_interleaved_requests_keep_their_positions", python, "!= one after another")


def test_uninstall_restores_the_forward_of_classes_that_hold_request_state():
    out = run_json("""
        import json
        import mlx_threadsafe
        from mlx_threadsafe.scenarios import vlm as scenarios
        model, _ = scenarios.qwen2_vl_requests()  # imports the model classes, unpatched
        holder = type(model.language_model)
        original = holder.__dict__.get("__call__")
        mlx_threadsafe.install()
        scenarios.qwen2_vl_requests()  # loaded again: the loader hook wraps the holder's forward
        wrapped = type(holder.__dict__.get("__call__")).__name__
        mlx_threadsafe.uninstall()
        print(json.dumps([wrapped, holder.__dict__.get("__call__") is original]))
    """, python=newest())
    assert out == ["FunctionWrapper", True]


def test_excluding_a_required_patch_disables_the_patch_that_requires_it():
    out = run_json("""
        import json
        import mlx_threadsafe
        status = mlx_threadsafe.install(exclude=["mlx_vlm.load.materialize"])
        row = status["mlx_vlm.generate_step.request_state"]
        print(json.dumps([str(row.state), row.reason]))
    """, python=newest())
    state, reason = out
    assert state == "disabled"
    assert reason == "requires mlx_vlm.load.materialize, which is disabled: install(exclude=...)"
