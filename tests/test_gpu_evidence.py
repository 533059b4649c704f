"""GPU evidence (compat_matrix verify --site-dirs): keys and device labels, the GPU section of the
tables, and check() holding GPU records to the matrix like the others. No MLX run: records are
copies of committed CPU records, relabelled."""

import copy
import json

import pytest

from compat_matrix import table, verify

H200 = "NVIDIA H200, CUDA 13.0, driver 580.159.03"
SMI_HEADER = ("| NVIDIA-SMI 580.159.03             Driver Version: 580.159.03     CUDA Version: 13.0     |\n")


@pytest.fixture(scope="module")
def evidence():
    return verify.load_evidence()


def _as_gpu(record, device=H200):
    gpu = copy.deepcopy(record)
    gpu.update(backend="cuda", device=device, installed={"python": "3.12.3", "transformers": "5.17.0"})
    # what a CUDA run applies besides the CPU's patches (mlx.cuda_capture_gate)
    gpu["applied"] = gpu["applied"] + [p for p in verify.planned_patches(gpu) if p not in gpu["applied"]]
    return gpu


def _gpu_copy(evidence, key="mlx-lm==0.32.2@mlx0.32.4"):
    records = {key: evidence[key]}
    records[key + "+cuda"] = _as_gpu(evidence[key])
    return records


def test_cpu_keys_are_unchanged_and_gpu_keys_name_the_backend():
    assert verify.Target("mlx-lm", "0.32.2", "0.32.4").key == "mlx-lm==0.32.2@mlx0.32.4"
    assert verify.Target("mlx-lm", "0.32.2", "0.32.4", "cuda").key == "mlx-lm==0.32.2@mlx0.32.4+cuda"
    keys = [t.key for t in verify.targets(["mlx-vlm==0.7.10"], ["0.32.4"], "cuda")]
    assert keys == ["mlx-vlm==0.7.10@mlx0.32.4+cuda"]
    assert verify.backend_of({"package": "mlx-lm"}) == "cpu"
    assert verify.backend_of({"backend": "cuda"}) == "cuda"


def test_the_device_is_named_from_nvidia_smi_and_mlx():
    assert verify.describe_device("NVIDIA H200, 580.159.03\n", SMI_HEADER, {}, "cuda") == H200
    assert (verify.describe_device("NVIDIA H200, 580.159.04\nNVIDIA H200, 580.159.04\n", SMI_HEADER, {}, "cuda")
            == "2 x NVIDIA H200, CUDA 13.0, driver 580.159.04")
    # no nvidia-smi: what mlx says of its device
    assert verify.describe_device("", "", {"device_name": "NVIDIA H200"}, "cuda") == "NVIDIA H200 (cuda)"
    assert (verify.describe_device("", "", {"device_name": "Intel Xeon", "architecture": "x86_64"}, "cpu")
            == "CPU, Intel Xeon (x86_64)")


def test_a_site_comes_first_on_the_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site:/repo")
    assert verify.site_env("/sites/mlx-lm-0.32.2") == {"PYTHONPATH": "/sites/mlx-lm-0.32.2:/tmp/site:/repo"}
    assert verify.site_dir("/sites", "mlx-vlm", "0.7.10") == "/sites/mlx-vlm-0.7.10"
    monkeypatch.delenv("PYTHONPATH")
    assert verify.site_env("/s") == {"PYTHONPATH": "/s"}


def test_gpu_records_are_saved_after_the_cpu_record_of_their_pair(tmp_path, evidence):
    records = _gpu_copy(evidence)
    path = str(tmp_path / "evidence.json")
    verify.save_evidence(dict(reversed(list(records.items()))), path)
    with open(path) as source:
        assert list(json.load(source)) == ["mlx-lm==0.32.2@mlx0.32.4", "mlx-lm==0.32.2@mlx0.32.4+cuda"]
    merged = {"other": evidence["mlx-lm==0.20.1@mlx0.32.4"]}
    assert verify.merge_evidence(merged, path) == list(records)
    assert merged["mlx-lm==0.32.2@mlx0.32.4+cuda"]["device"] == H200


def test_no_gpu_evidence_is_said_in_both_tables(evidence):
    cpu_only = {k: r for k, r in evidence.items() if verify.backend_of(r) == "cpu"}
    assert "## GPU\n\n" + table.NO_GPU_EVIDENCE in table.full_table(cpu_only)
    assert table.summary(cpu_only).endswith("On the GPU: no evidence yet (`compat_matrix/gpu_run.sh` runs the CI "
                                            "subset on a CUDA machine).")


def test_the_gpu_section_lists_each_pair_under_its_device(evidence):
    records = _gpu_copy(evidence)
    full = table.full_table(records)
    cpu_part, gpu_part = full.split("## GPU\n")
    assert cpu_part == table.full_table({k: r for k, r in records.items() if "+" not in k}).split("## GPU\n")[0]
    assert f"### {H200}: mlx 0.32.4 (cuda)" in gpu_part
    row = next(line for line in gpu_part.splitlines() if line.startswith("| mlx-lm 0.32.2 | 0.32.4 |"))
    assert "transformers 5.17.0" in row and row.endswith("| same |")
    old = _gpu_copy(evidence, "mlx-lm==0.20.1@mlx0.32.4")  # its n/a cells are listed, like the CPU's
    assert "0.20.1@0.32.4, 0.20.1@0.32.4+cuda |" in table.full_table(old).split("## Cells not run")[1]
    summary = table.summary(records)
    assert f"On the GPU: {H200}, mlx 0.32.4 (cuda)" in summary
    assert any(line.startswith("| mlx-lm | 0.32.2 | 0.32.4 |") and line.endswith("| same |")
               for line in summary.splitlines())


def test_a_verdict_that_differs_from_the_cpu_is_shown(evidence):
    records = _gpu_copy(evidence)
    gpu = records["mlx-lm==0.32.2@mlx0.32.4+cuda"]
    name = "generate_on_worker"
    gpu["scenarios"][name].update(verdict="fixed", without={"ok": False, "applicable": True, "detail": "x"})
    index = verify.SCENARIOS_BY_PACKAGE["mlx-lm"].index(name) + 1
    assert f"| S{index} ok on the CPU |" in table.full_table(records)
    assert verify.verdict_differences(gpu, records["mlx-lm==0.32.2@mlx0.32.4"]) == [f"{name}: not-needed -> fixed"]


def test_gpu_records_are_planned_with_their_backend():
    # mlx 0.31.2 binds CUDA streams to threads, the CPU's only from 0.32.0: the stream patches
    # apply to a CUDA record there and not to a CPU one
    record = {"package": "mlx-lm", "release": "0.31.1", "mlx": "0.31.2"}
    on_cpu = set(verify.planned_patches(record))
    on_cuda = set(verify.planned_patches(dict(record, backend="cuda")))
    assert "mlx_lm.generation_stream" in on_cuda - on_cpu


def test_check_agrees_with_a_gpu_record_like_its_cpu_record(evidence):
    assert verify.check_records(_gpu_copy(evidence)) == []
    assert verify.unrun_mlx_patches(_gpu_copy(evidence), cpu=False) == []


def test_check_reports_a_gpu_scenario_failing_with_the_shim(evidence):
    records = _gpu_copy(evidence)
    result = records["mlx-lm==0.32.2@mlx0.32.4+cuda"]["scenarios"]["generate_on_worker"]
    result["verdict"] = "FAILS"
    result["with"]["detail"] = "RuntimeError: There is no Stream(gpu, 0) in current thread."
    problems = verify.check_records(records)
    assert problems == ["mlx-lm==0.32.2@mlx0.32.4+cuda: generate_on_worker fails with the shim: "
                        "RuntimeError: There is no Stream(gpu, 0) in current thread."]


def test_check_reports_an_mlx_patch_no_gpu_record_ran(evidence):
    records = _gpu_copy(evidence)
    gpu = records["mlx-lm==0.32.2@mlx0.32.4+cuda"]
    gpu["applied"] = [p for p in gpu["applied"] if p != "mlx.module_streams"]
    problems = verify.check(records)
    assert ("mlx 0.32.4 (cuda): the matrix applies mlx.module_streams, but no cuda evidence ran it on that mlx "
            "(compat_matrix/gpu_run.sh)") in problems
    assert any(p.startswith("mlx-lm==0.32.2@mlx0.32.4+cuda: the matrix applies mlx.module_streams") for p in problems)
    # the CPU releases are held to the CPU records alone: the GPU record ran nothing for them
    assert not any(p.startswith("mlx 0.32.4: ") for p in verify.check(_gpu_copy(evidence)))
