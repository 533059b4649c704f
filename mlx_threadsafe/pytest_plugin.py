"""pytest plugin for projects that serve MLX models from threads (entry point `pytest11`).

Off by default: having the package installed never patches a test process. Turn it on
for the whole run with ``--mlx-threadsafe`` or the ini option ``mlx_threadsafe = true``,
or for one test with ``@pytest.mark.mlx_threadsafe`` (installed for that test, uninstalled
after). ``@pytest.mark.mlx_cross_thread`` runs a test body on a fresh non-main thread.
The fixtures work whether or not the shim is on.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from typing import Any, Callable, Dict, NamedTuple, Optional

import pytest

ACTIVE_KEY = pytest.StashKey[bool]()


class TinyModel(NamedTuple):
    path: str
    model: Any
    tokenizer: Any


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mlx_threadsafe")
    group.addoption("--mlx-threadsafe", action="store_true", default=None,
                    help="install mlx_threadsafe for the whole test run")
    group.addoption("--mlx-threadsafe-batch", action="store_true", default=None,
                    help="install mlx_threadsafe with the batch mode on (implies --mlx-threadsafe)")
    group.addoption("--mlx-threadsafe-timeout", type=float, default=None, metavar="SECONDS",
                    help="fail a test that runs longer, after dumping every thread's stack")
    parser.addini("mlx_threadsafe", type="bool", default=False, help="install mlx_threadsafe for the whole test run")
    parser.addini("mlx_threadsafe_timeout", default="", help="as --mlx-threadsafe-timeout")
    parser.addini("mlx_threadsafe_batch", type="bool", default=False, help="as --mlx-threadsafe-batch")


def _active(config: pytest.Config) -> bool:
    option = config.getoption("--mlx-threadsafe")
    return bool(option) if option is not None else bool(config.getini("mlx_threadsafe")) or _batch(config)


def _batch(config: pytest.Config) -> bool:
    option = config.getoption("--mlx-threadsafe-batch")
    return bool(option) if option is not None else bool(config.getini("mlx_threadsafe_batch"))


def _timeout(config: pytest.Config) -> Optional[float]:
    value = config.getoption("--mlx-threadsafe-timeout") or config.getini("mlx_threadsafe_timeout")
    return float(value) if value else None


def pytest_configure(config: pytest.Config) -> None:
    # Registered always, so --strict-markers passes whether or not the plugin is on.
    config.addinivalue_line("markers", "mlx_threadsafe: install mlx_threadsafe for this test, uninstall after")
    config.addinivalue_line("markers", "mlx_cross_thread: run this test body on a fresh non-main thread")
    config.stash[ACTIVE_KEY] = _active(config)
    if config.stash[ACTIVE_KEY]:
        import mlx_threadsafe

        # each xdist worker is its own process and installs on its own
        mlx_threadsafe.install(batch=True if _batch(config) else None)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(ACTIVE_KEY, False):
        import mlx_threadsafe

        mlx_threadsafe.uninstall()


def pytest_report_header(config: pytest.Config):
    if not config.stash.get(ACTIVE_KEY, False):
        return None
    import mlx_threadsafe

    status = mlx_threadsafe.status()
    applied = status.ids("applied") + status.ids("pending-import")
    return [f"mlx_threadsafe {mlx_threadsafe.__version__}: {status.environment.describe()}",
            f"mlx_threadsafe patches: {', '.join(applied) or 'none'}"]


@pytest.fixture(autouse=True)
def _mlx_threadsafe_marker(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("mlx_threadsafe") is None or request.config.stash.get(ACTIVE_KEY, False):
        yield
        return
    import mlx_threadsafe

    mlx_threadsafe.install()
    try:
        yield
    finally:
        mlx_threadsafe.uninstall()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    if pyfuncitem.get_closest_marker("mlx_cross_thread") is None:
        return None
    from .testing import on_new_thread

    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    on_new_thread(pyfuncitem.obj, **arguments)
    return True


def dump_threads(file=None) -> str:
    """Every thread's stack, named (the shim's Workers included), as text; also written to `file`."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} (ident {ident}) ---\n"
                     + "".join(traceback.format_stack(frame)))
    text = "\n".join(parts)
    if file is not None:
        file.write(text)
        file.flush()
    return text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    timeout = _timeout(item.config)
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not timeout or not usable:
        yield
        return

    def on_timeout(signum, frame):
        pytest.fail(f"timed out after {timeout:g}s; every thread, workers by name:\n{dump_threads()}", pytrace=False)

    previous = signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def mlx_threadsafe_status():
    """The shim's status table for this process (what is applied, skipped, and why)."""
    import mlx_threadsafe

    return mlx_threadsafe.status()


_loaded: Dict[str, TinyModel] = {}


@pytest.fixture
def mlx_tiny_model() -> Callable[[str], TinyModel]:
    """A factory: arch ('llama', 'llama3rope', 'gemma3_text', 'qwen3') -> TinyModel(path, model, tokenizer).

    Built offline, cached on disk across tests and xdist workers, loaded once per process.
    """

    def get(arch: str = "llama") -> TinyModel:
        if arch not in _loaded:
            from mlx_lm import load

            from .testing import build_lm

            path = str(build_lm(arch))
            model, tokenizer = load(path)[:2]
            _loaded[arch] = TinyModel(path, model, tokenizer)
        return _loaded[arch]

    return get


@pytest.fixture
def mlx_worker(request: pytest.FixtureRequest):
    """A `mlx_threadsafe.Worker`, closed at teardown (its queued work is cancelled)."""
    import warnings

    from . import MlxThreadsafeWarning, Worker

    timeout = _timeout(request.config)
    worker = Worker(name=f"mlx-worker[{request.node.name}]")
    yield worker
    # The operation in flight may never end (that is what a stuck test looks like):
    # wait a bounded time, then leave the daemon thread behind rather than hang the run.
    worker.close(timeout=timeout or 30.0)
    if worker.is_alive:
        warnings.warn(f"{worker.name} was still running an operation at teardown; left behind",
                      MlxThreadsafeWarning, stacklevel=1)


@pytest.fixture
def mlx_on_new_thread() -> Callable[..., Any]:
    """`mlx_on_new_thread(fn, *args, **kwargs)`: runs fn on a fresh thread, returns its result, re-raises its error."""
    from .testing import on_new_thread

    return on_new_thread


