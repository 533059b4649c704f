"""The shim's one exit hook: its steps run in a fixed order, whoever added them first.

Registered with ``atexit`` when this module is first imported (by ``install()``, before
any patch applies), so it runs after every exit handler the program registers later.
Order: stop the servers' generation threads, then the Workers, then wait for the OS
threads of ended MLX threads (their C++ ``thread_local`` destructors must finish before
the interpreter finalizes, or the process aborts).
"""

from __future__ import annotations

import atexit
import logging
from typing import Callable, Dict, List

log = logging.getLogger("mlx_threadsafe")

STOP_SERVERS, STOP_WORKERS, WAIT_FOR_THREADS = "stop servers", "stop workers", "wait for ended threads"
PHASES = (STOP_SERVERS, STOP_WORKERS, WAIT_FOR_THREADS)

_steps: Dict[str, List[Callable[[], None]]] = {phase: [] for phase in PHASES}


def add(phase: str, step: Callable[[], None]) -> None:
    _steps[phase].append(step)


def remove(phase: str, step: Callable[[], None]) -> None:
    if step in _steps[phase]:
        _steps[phase].remove(step)


@atexit.register
def _run() -> None:
    for phase in PHASES:
        for step in list(_steps[phase]):
            try:
                step()
            except Exception:  # noqa: BLE001 - exiting anyway; the next steps still run
                log.exception("exit step %r (%s) failed", step, phase)
