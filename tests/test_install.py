"""install()/uninstall() orderings, identity of restored objects, status rows, bad inputs.

Each test runs in a fresh interpreter: patches change global state (ddtrace's
PatchTestCase does the same).
"""

from helpers import run_json, run_python

ORIGINALS = """
import importlib, mlx.core as mx, mlx_lm
utils = importlib.import_module("mlx_lm.utils")
gen = importlib.import_module("mlx_lm.generate")
def snapshot():
    return {
        "mlx.core.eval": mx.eval, "mlx.core.async_eval": mx.async_eval, "mlx.core.random.seed": mx.random.seed,
        "mlx_lm.load": mlx_lm.load, "mlx_lm.utils.load": utils.load, "mlx_lm.utils.load_model": utils.load_model,
        "mlx_lm.utils.load_adapters": utils.load_adapters, "mlx_lm.utils.sharded_load": utils.sharded_load,
        "generation_stream": gen.generation_stream,
        "generate_step.__defaults__": gen.generate_step.__defaults__,
        "stream_generate.__defaults__": gen.stream_generate.__defaults__,
        "generate_step.__kwdefaults__": gen.generate_step.__kwdefaults__,
    }
"""


def test_importing_the_package_patches_nothing_and_imports_no_mlx():
    out = run_json("""
        import json, sys
        import mlx_threadsafe
        mlx_modules = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'mlx_vlm'))
        print(json.dumps([mlx_threadsafe.is_installed(), mlx_modules]))
    """)
    assert out == [False, []]


def test_install_before_import_is_lazy_and_applies_on_import():
    out = run_json("""
        import json, sys
        import mlx_threadsafe
        status = mlx_threadsafe.install()
        before = {r.id: r.state for r in status}
        imported = [m for m in ('mlx_lm', 'mlx_vlm', 'mlx.core') if m in sys.modules]
        import mlx_lm
        after = {r.id: r.state for r in mlx_threadsafe.status()}
        print(json.dumps([before, imported, after, type(mlx_lm.load).__name__]))
    """)
    before, imported, after, load_type = out
    assert imported == []
    assert before["mlx_lm.load.materialize"] == "pending-import"
    assert before["mlx.thread_cleanup"] == "pending-import"
    assert after["mlx_lm.load.materialize"] == "applied"
    assert after["mlx.thread_cleanup"] == "applied"
    assert load_type == "FunctionWrapper"


def test_install_after_import_applies_at_once():
    out = run_json("""
        import json, mlx_lm, mlx_threadsafe
        print(json.dumps({r.id: r.state for r in mlx_threadsafe.install()}))
    """)
    assert out["mlx_lm.load.materialize"] == "applied"
    assert out["mlx_lm.generation_stream"] == "skipped"  # 0.32.x already has a ThreadLocalStream


def test_install_twice_is_idempotent():
    out = run_json("""
        import json, mlx_lm, mlx_threadsafe
        mlx_threadsafe.install()
        first = mlx_lm.load
        second_status = mlx_threadsafe.install()
        same_status = str(second_status) == str(mlx_threadsafe.status())
        print(json.dumps([mlx_lm.load is first, type(mlx_lm.load.__wrapped__).__name__, same_status]))
    """)
    assert out == [True, "function", True]


def test_uninstall_restores_every_original_object_exactly():
    out = run_json(ORIGINALS + """
import json, mlx_threadsafe
before = snapshot()
mlx_threadsafe.install()
during = snapshot()
mlx_threadsafe.uninstall()
after = snapshot()
changed = sorted(k for k in before if during[k] is not before[k])
print(json.dumps([changed, sorted(k for k in before if after[k] is not before[k]), mlx_threadsafe.is_installed()]))
""")
    changed, not_restored, installed = out
    assert {"mlx.core.eval", "mlx_lm.load", "mlx_lm.utils.load_model"} <= set(changed)
    assert not_restored == []
    assert installed is False


def test_install_uninstall_install_applies_again():
    out = run_json(ORIGINALS + """
import json, mlx_threadsafe
original = snapshot()
mlx_threadsafe.install(); mlx_threadsafe.uninstall()
states = {r.id: r.state for r in mlx_threadsafe.install()}
print(json.dumps([states["mlx_lm.load.materialize"], mlx_lm.load is not original["mlx_lm.load"],
                  mlx_lm.load.__wrapped__ is original["mlx_lm.load"]]))
""")
    assert out == ["applied", True, True]


def test_uninstall_before_import_cancels_pending_hooks():
    out = run_json("""
        import json, mlx_threadsafe
        mlx_threadsafe.install(); mlx_threadsafe.uninstall()
        import mlx_lm, mlx.core as mx
        states = [r.state for r in mlx_threadsafe.status()]
        print(json.dumps([type(mlx_lm.load).__name__, type(mx.eval).__name__, states]))
    """)
    load_type, eval_type, states = out
    assert load_type == "function" and eval_type != "FunctionWrapper"
    assert set(states) == {"not-installed"}


def test_uninstall_without_install_and_twice_is_harmless():
    out = run_json("""
        import json, mlx_lm, mlx_threadsafe
        original = mlx_lm.load
        mlx_threadsafe.uninstall(); mlx_threadsafe.install(); mlx_threadsafe.uninstall(); mlx_threadsafe.uninstall()
        print(json.dumps(mlx_lm.load is original))
    """)
    assert out is True


def test_status_rows_name_target_state_reason_and_versions():
    out = run_json("""
        import json, mlx_threadsafe
        s = mlx_threadsafe.install()
        print(json.dumps([[r.id, r.target, r.state, r.reason] for r in s] + [s.versions, str(s)]))
    """)
    *rows, found_versions, table = out
    assert {r[0] for r in rows} >= {"mlx_lm.generation_stream", "mlx_lm.load.materialize", "mlx.thread_cleanup"}
    assert all(r[2] in {"applied", "pending-import", "skipped", "failed", "disabled"} and r[3] for r in rows)
    assert found_versions["mlx"] and found_versions["mlx-lm"]
    assert "mlx_lm.load.materialize" in table and "pending-import" in table


def test_environment_and_arguments_disable_patches():
    out = run_json("""
        import json, mlx_threadsafe
        s = mlx_threadsafe.install(exclude=["mlx.thread_rng"])
        print(json.dumps({r.id: r.state for r in s}))
    """, env={"MLX_THREADSAFE_DISABLE": "mlx_lm.load.materialize"})
    assert out["mlx_lm.load.materialize"] == "disabled"
    assert out["mlx.thread_rng"] == "disabled"
    assert out["mlx.thread_cleanup"] == "pending-import"
    everything = run_json("""
        import json, mlx_threadsafe
        print(json.dumps(sorted({r.state for r in mlx_threadsafe.install()})))
    """, env={"MLX_THREADSAFE_DISABLE": "*"})
    assert everything == ["disabled"]


def test_an_unknown_patch_id_is_a_clear_error():
    done = run_python("import mlx_threadsafe; mlx_threadsafe.install(only=['mlx_lm.nope'])")
    assert done.returncode == 1 and "unknown patch id(s): ['mlx_lm.nope']" in done.stderr


FAKE_VERSION = """
from mlx_threadsafe import versions
real = versions.detect()
versions.detect = lambda: real._replace(**{FIELDS})
"""


def test_mlx_lm_not_installed_is_a_skipped_row_not_an_error():
    out = run_json(FAKE_VERSION.replace("{FIELDS}", "{'mlx_lm': None}") + """
import json, mlx_threadsafe
print(json.dumps(mlx_threadsafe.install()["mlx_lm.load.materialize"]._asdict()))
""")
    assert out["state"] == "skipped" and out["reason"] == "mlx-lm is not installed"


def test_a_newer_release_than_the_matrix_knows_warns_once_and_probes():
    done = run_python(FAKE_VERSION.replace("{FIELDS}", "{'mlx_lm': '0.99.0'}") + """
import json, warnings, mlx_lm, mlx_threadsafe
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    s = mlx_threadsafe.install()
print(json.dumps([s["mlx_lm.load.materialize"].state, s["mlx_lm.generation_stream"].state,
                  s["mlx_lm.generation_stream"].reason, [str(w.message) for w in caught]]))
""")
    assert done.returncode == 0, done.stderr
    import json

    materialize_state, stream_state, stream_reason, messages = json.loads(done.stdout.splitlines()[-1])
    assert materialize_state == "applied"
    # the probe sees that 0.99.0's stream is already thread-local
    assert stream_state == "skipped" and "already an mx.ThreadLocalStream" in stream_reason
    assert [m for m in messages if "0.99.0 is newer than the compat matrix" in m] and len(messages) == 1


def test_a_target_that_moved_is_skipped_with_the_reason():
    out = run_json(FAKE_VERSION.replace("{FIELDS}", "{'mlx_lm': '0.31.1'}") + """
import json, importlib, mlx_lm, mlx_threadsafe
utils = importlib.import_module("mlx_lm.utils")
for name in ("load", "load_model", "load_adapters", "sharded_load"):
    delattr(utils, name)
s = mlx_threadsafe.install()
print(json.dumps([s["mlx_lm.load.materialize"]._asdict(), s["mlx_lm.generation_stream"]._asdict()]))
""")
    load_row, stream_row = out
    assert load_row["state"] == "skipped" and load_row["reason"].startswith("target moved: none of mlx_lm.utils.load")
    # 0.31.1 expects a module mx.Stream; the real 0.32.2 module holds a ThreadLocalStream
    assert stream_row["state"] == "skipped" and "already an mx.ThreadLocalStream" in stream_row["reason"]


def test_a_patch_that_breaks_is_reported_failed_and_the_host_keeps_running():
    done = run_python("""
import json, warnings, mlx_threadsafe
from mlx_threadsafe.patches import by_id
def broken(package):
    raise ZeroDivisionError("boom")
by_id("mlx_lm.load.materialize")._apply = broken
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mlx_threadsafe.install()
    import mlx_lm
row = mlx_threadsafe.status()["mlx_lm.load.materialize"]
print(json.dumps([row.state, row.reason, [w.category.__name__ for w in caught], type(mlx_lm.load).__name__]))
""")
    assert done.returncode == 0, done.stderr
    import json

    state, reason, categories, load_type = json.loads(done.stdout.splitlines()[-1])
    assert state == "failed" and "boom" in reason
    assert categories == ["MlxThreadsafeWarning"]
    assert load_type == "function"


def test_status_cli_prints_the_table():
    done = run_python("from mlx_threadsafe.cli import main; main(['status'])")
    assert done.returncode == 0 and "mlx_lm.load.materialize" in done.stdout
