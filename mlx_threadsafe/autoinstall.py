"""Start-up installation, shared by the opt-in hook and the runner's sitecustomize.

`mlx_threadsafe-autoinstall.pth` (shipped at the top of site-packages, one line: a
.pth cannot import helpers before deciding) calls `run()` only when MLX_THREADSAFE is
set to something other than 0/false/no/off, so other processes pay one dictionary
lookup and import nothing. Start-up code must never take the host program down: a
failure to install becomes one line on stderr (and a package too broken to import is
reported by `site` itself, which then goes on).
"""

from __future__ import annotations

import sys

# The first import of one of these installs the shim; until then nothing else is imported.
TRIGGERS = ("mlx", "mlx_lm", "mlx_vlm")


def run(origin: str) -> None:
    """Install the shim at start-up: now if MLX is already imported, else at its first import.

    Until then the process carries only the standard-library import watcher, so a
    Python process that never touches MLX (pip, a script) pays almost nothing.
    """
    try:
        if any(name in sys.modules for name in TRIGGERS):
            _install(origin)
            return
        from . import import_watch

        def install_before_first_mlx_import(name: str) -> None:
            # Before any of its code runs: every target is then patched as it completes.
            if name.partition(".")[0] in TRIGGERS:
                import_watch.unwatch(install_before_first_mlx_import)
                _install(origin)

        import_watch.watch_before(install_before_first_mlx_import)
    except Exception as error:  # noqa: BLE001 - see the module docstring
        _report(origin, error)


def _install(origin: str) -> None:
    try:
        import mlx_threadsafe

        mlx_threadsafe.install()
    except Exception as error:  # noqa: BLE001 - see the module docstring
        _report(origin, error)


def _report(origin: str, error: BaseException) -> None:
    sys.stderr.write(f"mlx_threadsafe ({origin}): not installed at start-up: {type(error).__name__}: {error}\n")
