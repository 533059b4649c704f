"""Loaded by every Python process that `mlx-threadsafe run` starts (this directory leads PYTHONPATH).

It installs the shim, then chain-loads the `sitecustomize` the process would have
loaded without us, so the user's own start-up code still runs. While it works it takes
this directory off PYTHONPATH, so that a process started during bootstrap (by the user's
sitecustomize, say) does not bootstrap again; the variable is put back afterwards so the
application's own subprocesses get the shim too.
"""

import os
import sys


def _without(entries, directory):
    return [entry for entry in entries if entry and os.path.abspath(entry) != directory]


def _chain_load_user_sitecustomize(directory):
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _without(sys.path, directory))
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _bootstrap():
    directory = os.path.dirname(os.path.abspath(__file__))
    saved_pythonpath = os.environ.get("PYTHONPATH")
    if saved_pythonpath is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join(_without(saved_pythonpath.split(os.pathsep), directory))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != directory]
    try:
        try:
            from mlx_threadsafe import autoinstall
        except ImportError as error:
            sys.stderr.write(f"mlx_threadsafe (run): this interpreter ({sys.executable}) cannot import "
                             f"mlx_threadsafe ({error}); running without the shim\n")
        else:
            autoinstall.run("mlx-threadsafe run")
        _chain_load_user_sitecustomize(directory)
    finally:
        if saved_pythonpath is not None:
            os.environ["PYTHONPATH"] = saved_pythonpath


_bootstrap()
