"""Unchanged model servers under the runner and the opt-in start-up hook: a soak per release.

Each soak is a real `mlx_lm.server` process on 127.0.0.1 with a tiny offline model:
16 concurrent clients (chat and text completions, streaming and not), 4 more that hang
up mid-stream, then SIGINT. See mlx_threadsafe/soak.py for what is counted.
"""

import pytest

from conftest import run_python
from mlx_threadsafe.soak import soak
from releases import release_python

RELEASES = ["0.30.7", "0.31.1", "0.31.3", "0.32.2"]
FAILING_WITHOUT_SHIM = ["0.30.7", "0.31.1"]  # module stream made on the importing thread


def _release_model(version):
    python = release_python(f"mlx-lm=={version}")
    built = run_python("from mlx_threadsafe.testing import build_lm; print(build_lm('llama'))", python=python)
    assert built.returncode == 0, built.stderr
    return python, built.stdout.strip().splitlines()[-1]


@pytest.mark.release
@pytest.mark.parametrize("version", RELEASES)
def test_server_under_the_runner_answers_every_request_and_exits_cleanly(version):
    python, model = _release_model(version)
    result = soak(python, model, via="run")
    assert result.ok, result.summary() + "\n" + result.stderr_tail


@pytest.mark.release
@pytest.mark.parametrize("version", FAILING_WITHOUT_SHIM)
def test_old_server_without_the_shim_answers_nothing(version):
    python, model = _release_model(version)
    result = soak(python, model, via="none", clients=4, hang_ups=0, request_timeout=20)
    assert result.answered == 0, result.summary()
    assert any("There is no Stream(cpu, 0) in current thread" in line for line in result.bad_stderr), result.stderr_tail


@pytest.mark.release
def test_server_with_the_start_up_hook_answers_every_request():
    python, model = _release_model("0.31.1")
    result = soak(python, model, via="env")
    assert result.ok, result.summary() + "\n" + result.stderr_tail
