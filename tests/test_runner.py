"""`mlx-threadsafe run` and the MLX_THREADSAFE=1 start-up hook, each in fresh processes."""

import os
import sys

from helpers import ROOT, run_python

CHECK = "import mlx_threadsafe, sys; print(mlx_threadsafe.is_installed(), 'mlx.core' in sys.modules)"
# The shim installs at the first import of mlx (or mlx_lm / mlx_vlm): until then nothing loads.
AFTER_MLX = "import mlx.core, mlx_threadsafe; print(mlx_threadsafe.is_installed())"


def _run(*command, env=None, cwd=ROOT):
    import subprocess

    child_env = dict(os.environ, **(env or {}))
    child_env.pop("MLX_THREADSAFE", None)
    return subprocess.run([sys.executable, "-m", "mlx_threadsafe", "run", "--", *command],
                          capture_output=True, text=True, env=child_env, cwd=cwd, timeout=120)


def test_run_installs_the_shim_in_the_command_and_its_child_processes():
    code = ("import mlx.core, mlx_threadsafe, subprocess, sys; print(mlx_threadsafe.is_installed()); "
            "print(subprocess.check_output([sys.executable, '-c', 'import mlx.core, mlx_threadsafe; "
            "print(mlx_threadsafe.is_installed())'], text=True).strip())")
    done = _run(sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_without_run_nothing_is_installed():
    done = run_python(CHECK, env={"MLX_THREADSAFE": ""})
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_run_chain_loads_the_users_own_sitecustomize(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\n")
    done = _run(sys.executable, "-c", "import os, mlx.core, mlx_threadsafe; "
                "print(os.environ.get('USER_SITECUSTOMIZE'), mlx_threadsafe.is_installed())",
                env={"PYTHONPATH": str(tmp_path)})
    assert done.stdout.split() == ["ran", "True"], done.stderr


def test_a_process_started_by_the_users_sitecustomize_does_not_bootstrap_again(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import os, subprocess, sys\n"
        "os.environ['PYTHONPATH_DURING_BOOTSTRAP'] = os.environ.get('PYTHONPATH', '')\n")
    done = _run(sys.executable, "-c", "import os; print(os.environ['PYTHONPATH_DURING_BOOTSTRAP']); "
                "print(os.environ['PYTHONPATH'])", env={"PYTHONPATH": str(tmp_path)})
    during, after = done.stdout.split()
    assert during == str(tmp_path), "bootstrap directory leaked into PYTHONPATH during bootstrap"
    assert after.endswith(str(tmp_path)) and "bootstrap" in after, "children of the application lost the shim"


def test_run_reports_a_missing_command():
    done = _run("no-such-command-mlx-threadsafe")
    assert done.returncode == 127
    assert "command not found: no-such-command-mlx-threadsafe" in done.stderr


def test_run_info_prints_the_status_for_the_commands_interpreter():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "mlx_threadsafe", "run", "--info", "--", sys.executable, "-c",
                           "raise SystemExit('the command itself must not run')"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"interpreter: {sys.executable}" in done.stdout
    assert "mlx.thread_cleanup" in done.stdout and "the command itself" not in done.stderr


def test_an_interpreter_without_the_package_runs_unshimmed_with_a_warning(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)
    bare_python = str(tmp_path / "bare" / "bin" / "python")
    done = _run(bare_python, "-c", "print('still runs')", cwd=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "still runs"
    assert "cannot import mlx_threadsafe" in done.stderr and "running without the shim" in done.stderr


def test_start_up_hook_imports_only_the_standard_library_until_mlx_is_imported():
    # Only its own four modules: no wrapt, packaging or mlx, and nothing of the standard
    # library that start-up had not loaded already (`__future__`, `types`, `typing`).
    code = "import sys; print(' '.join(sorted(sys.modules)))"
    hooked, bare = (run_python(code, env={"MLX_THREADSAFE": value}) for value in ("1", "0"))
    added = sorted(set(hooked.stdout.split()) - set(bare.stdout.split()))
    assert added == ["mlx_threadsafe", "mlx_threadsafe.autoinstall", "mlx_threadsafe.import_watch",
                     "mlx_threadsafe.materialize"], hooked.stderr


def test_start_up_hook_installs_at_the_first_import_of_mlx():
    # Installed, waiting: neither mlx nor the registry (wrapt) is loaded yet.
    done = run_python(CHECK + "; print('wrapt' in sys.modules)", env={"MLX_THREADSAFE": "1"})
    assert done.stdout.split() == ["True", "False", "False"], done.stderr
    done = run_python(AFTER_MLX + "; print(mlx_threadsafe.status()['mlx.thread_cleanup'].state)",
                      env={"MLX_THREADSAFE": "1"})
    assert done.stdout.split() == ["True", "applied"], done.stderr


def test_start_up_hook_is_silent_and_imports_nothing_when_unset():
    done = run_python("import sys; print(sorted(m for m in sys.modules if m.startswith(('mlx', 'wrapt'))))",
                      env={"MLX_THREADSAFE": "0"})
    assert done.stdout.strip() == "[]" and done.stderr == ""


def test_start_up_hook_failure_warns_and_the_program_still_runs(tmp_path):
    # a broken dependency shadowing the real one makes `import mlx_threadsafe` fail at start-up
    (tmp_path / "wrapt.py").write_text("raise ImportError('wrapt is broken here')\n")
    done = run_python("import mlx.core; print('program ran')", env={"MLX_THREADSAFE": "1", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "program ran", done.stderr
    assert "wrapt is broken here" in done.stderr
