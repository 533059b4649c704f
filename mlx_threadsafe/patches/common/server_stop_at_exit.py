"""A server's generation thread is stopped, and waited for, before the interpreter finalizes.

mlx-lm's and mlx-vlm's servers generate on the thread of a ``ResponseGenerator``, which may
still run at exit (mlx-vlm never stops it; an interrupted ``join()`` on Python < 3.13 leaves
mlx-lm's running), and a thread owning MLX state as the interpreter finalizes aborts the process.
Every ResponseGenerator is remembered (weakly); at exit each is asked to stop (its own
``stop_and_join(timeout=)``, else the ``_stop`` flag its loop reads) and its OS thread is waited
for, at most STOP_TIMEOUT_S: ``Thread.join()`` returns at once after a KeyboardInterrupt (bpo-45274).
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
import weakref
from types import ModuleType
from typing import Any, List

import wrapt

from ... import exit_steps, streams
from ...errors import TargetMissing
from ...registry import Patch

log = logging.getLogger("mlx_threadsafe")
STOP_TIMEOUT_S = 10.0


class ServerStopAtExitPatch(Patch):
    """Stops the generation threads of `server_module`'s ResponseGenerators at exit.

    Generators are found two ways: remembered as they are built, once `trigger` (the
    server module) is imported; and, at exit, among the live threads whose target is a
    ResponseGenerator method, which also finds the generator of a server run as
    ``python -m`` (its module is ``__main__``, never imported under its name).
    """

    def __init__(self, *, server_module: str, **fields) -> None:
        super().__init__(target=f"{server_module}.ResponseGenerator",
                         description="its generation thread is stopped at exit", **fields)
        self.server_module = server_module
        self._generators: "weakref.WeakSet" = weakref.WeakSet()

    def _apply(self, module: ModuleType) -> None:
        server = sys.modules.get(self.server_module)
        if server is not None:
            cls = getattr(server, "ResponseGenerator", None)
            if cls is None or not callable(getattr(cls, "stop_and_join", None)):
                raise TargetMissing(f"no ResponseGenerator.stop_and_join in {self.server_module}")
            self.originals.set_attribute(cls, "__init__", wrapt.FunctionWrapper(cls.__init__, self._remember))
        exit_steps.add(exit_steps.STOP_SERVERS, self._stop_generators)
        self.originals.on_restore(lambda: exit_steps.remove(exit_steps.STOP_SERVERS, self._stop_generators))

    def _remember(self, wrapped, instance, args, kwargs):
        wrapped(*args, **kwargs)
        self._generators.add(instance)

    def _running_generators(self) -> List[Any]:
        found = list(self._generators)
        for thread in threading.enumerate():
            owner = getattr(getattr(thread, "_target", None), "__self__", None)
            if owner is not None and self._is_response_generator(type(owner)) and owner not in found:
                found.append(owner)
        return found

    def _is_response_generator(self, cls: type) -> bool:
        home = sys.modules.get(cls.__module__)
        spec = getattr(home, "__spec__", None)
        module = spec.name if cls.__module__ == "__main__" and spec is not None else cls.__module__
        return cls.__name__ == "ResponseGenerator" and module == self.server_module

    def _stop_generators(self) -> None:
        for generator in self._running_generators():
            try:
                _stop_and_join(generator, STOP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - exiting anyway; say why it could not stop
                log.exception("could not stop the %s generation thread at exit", self.package)


def _stop_and_join(generator, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    stop_and_join = generator.stop_and_join
    if "timeout" in inspect.signature(stop_and_join).parameters:
        stop_and_join(timeout=timeout)
    else:
        generator._stop = True
    thread = getattr(generator, "_generation_thread", None)
    if thread is not None and not streams.wait_for_thread(thread, max(0.0, deadline - time.monotonic())):
        log.warning("the %s generation thread did not stop within %.0f s", type(generator).__module__, timeout)
