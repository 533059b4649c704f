"""Start-up installation, shared by the opt-in hook and the runner's sitecustomize.

`mlx_threadsafe-autoinstall.pth` (shipped at the top of site-packages, one line: a
.pth cannot import helpers before deciding) calls `run()` only when MLX_THREADSAFE is
set to something other than 0/false/no/off, so other processes pay one dictionary
lookup and import nothing. Start-up code must never take the host program down: a
failure to install becomes one line on stderr (and a package too broken to import is
reported by `site` itself, which then goes on).
"""

import sys


def run(origin: str) -> None:
    """Install the shim at start-up: now if MLX is already imported, else at its first import.

    install() itself waits for the first import of mlx, mlx_lm or mlx_vlm; until then
    the process carries only the standard-library import watcher, so a Python process
    that never touches MLX (pip, a script) pays almost nothing.
    """
    try:
        import mlx_threadsafe

        if not mlx_threadsafe.install_later():
            mlx_threadsafe.install_now()
    except Exception as error:  # noqa: BLE001 - see the module docstring
        sys.stderr.write(f"mlx_threadsafe ({origin}): not installed at start-up: {type(error).__name__}: {error}\n")
