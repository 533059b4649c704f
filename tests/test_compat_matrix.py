"""The compat-matrix harness: the committed evidence agrees with the runtime matrix, and the
check catches a wrong matrix row; the CI subset of releases is verified for real."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from compat_matrix import verify


def _matrix_text():
    from importlib.resources import files

    return files("mlx_threadsafe").joinpath("compat.toml").read_text()


def _check_with_row_changed(row, replacement, records=None):
    """The problems `check` finds with `row` of the committed matrix (asserted present) replaced once."""
    text = _matrix_text()
    assert row in text
    return verify.check(verify.load_evidence() if records is None else records, text.replace(row, replacement, 1))


def test_the_committed_evidence_covers_the_ci_subset_and_agrees_with_the_matrix():
    records = verify.load_evidence()
    keys = {f"{r['package']}=={r['release']}" for r in records.values()}
    assert set(verify.RELEASES["ci"]) <= keys
    assert verify.check(records) == []


def test_a_matrix_row_that_drops_a_needed_patch_is_caught():
    # the 0.29.1-0.31.2 row without generation_stream: 0.31.1 needs it on mlx 0.32.4
    row = _matrix_text().split('releases = ">=0.29.1,<0.31.3"')[1].split("[[")[0]
    wrong = _matrix_text().replace(row, row.replace('"mlx_lm.generation_stream",', "", 1))
    assert wrong != _matrix_text()
    problems = verify.check(verify.load_evidence(), wrong)
    assert any("drops mlx_lm.generation_stream, but generate_on_worker" in p for p in problems), problems


def test_an_mlx_row_that_drops_the_module_stream_fix_is_caught():
    # mlx 0.32.4: a stream a module makes at import fails on every other thread without it
    problems = _check_with_row_changed(
        '"mlx.thread_cleanup", "mlx.thread_rng", "mlx.module_streams", "mlx.distributed.one_thread",\n'
        '  "mlx.cuda_graph_capture",',
        '"mlx.thread_cleanup", "mlx.thread_rng", "mlx.distributed.one_thread",\n  "mlx.cuda_graph_capture",')
    assert any("mlx0.32.4: the matrix drops mlx.module_streams, but module_stream_on_request_thread"
               in p for p in problems), problems


def test_an_mlx_row_that_drops_the_compiled_sampler_fix_is_caught():
    # mlx 0.31.2: mlx-lm's samplers froze off the import thread without it
    problems = _check_with_row_changed(
        '"mlx.thread_cleanup", "mlx.thread_rng", "mlx.compile.random_state", "mlx.module_streams",',
        '"mlx.thread_cleanup", "mlx.thread_rng", "mlx.module_streams",')
    assert any("mlx0.31.2: the matrix drops mlx.compile.random_state, but compiled_sampler_advances_on_worker"
               in p for p in problems), problems


def test_the_oldest_row_without_the_detokenizer_fix_is_caught():
    # mlx-lm 0.11.0 (it runs next to huggingface_hub < 0.25): 8 threads on one tokenizer garble text
    problems = _check_with_row_changed(
        'releases = ">=0.0.1,<0.20.1"\npatches = ["mlx_lm.load.materialize", "mlx_lm.TokenizerWrapper.detokenizer"]',
        'releases = ">=0.0.1,<0.20.1"\npatches = ["mlx_lm.load.materialize"]')
    assert any("mlx-lm==0.11.0@mlx0.32.4: the matrix drops mlx_lm.TokenizerWrapper.detokenizer, but "
               "eight_threads_share_a_tokenizer" in p for p in problems), problems


def test_releases_older_than_today_s_huggingface_hub_get_their_pin():
    assert verify.pins_for("mlx-lm", "0.18.1") == ["huggingface_hub<0.25"]
    assert verify.pins_for("mlx-lm", "0.18.2") == [] and verify.pins_for("mlx-vlm", "0.1.0") == []
    record = verify.load_evidence()["mlx-lm==0.12.0@mlx0.32.4"]
    assert record["pins"] == ["huggingface_hub<0.25"] and record["state"] == "ran"


def test_a_matrix_row_that_adds_an_unverified_patch_is_caught():
    records = {k: r for k, r in verify.load_evidence().items() if r["state"] == "ran" and r["mlx"] == "0.32.4"
               and r["package"] == "mlx-lm" and r["release"] == "0.20.1"}
    assert records, "the evidence lacks mlx-lm 0.20.1 on mlx 0.32.4"
    first_row = 'releases = ">=0.20.1,<0.28.0"\npatches = ["mlx_lm.generation_stream",'
    problems = _check_with_row_changed(first_row, first_row + ' "mlx_lm.BatchGenerator.owner",', records)
    assert any("applies mlx_lm.BatchGenerator.owner, but the evidence never ran it" in p for p in problems), problems


def test_a_scenario_failing_with_the_shim_is_a_disagreement():
    records = json.loads(json.dumps(verify.load_evidence()))
    record = next(r for r in records.values() if r["state"] == "ran")
    name = next(iter(record["scenarios"]))
    record["scenarios"][name]["verdict"] = "FAILS"
    record["scenarios"][name]["with"]["detail"] = "RuntimeError: boom"
    assert any(f"{name} fails with the shim: RuntimeError: boom" in p for p in verify.check(records))


@pytest.mark.release
@pytest.mark.parametrize("requirement", verify.RELEASES["ci"])
def test_the_ci_subset_verified_again_agrees_with_the_matrix(requirement):
    package, _, release = requirement.partition("==")
    target = verify.Target(package, release, "0.32.4")
    record = verify.run_target(target)
    assert record["state"] == "ran", record
    assert verify.check_records({target.key: record}) == []


def test_check_command_exits_zero_on_the_committed_evidence():
    done = subprocess.run([sys.executable, "-m", "compat_matrix", "check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the matrix agrees with it" in done.stdout
