"""mlx_vlm.server.stop_at_exit: the server's generation thread ends, on itself, before the process does.

mlx-vlm's server runs generation on one daemon thread (`ResponseGenerator`), which
clears its MLX streams when it ends, but the server stops it only when a model is
unloaded, never at shutdown. At exit the thread is still alive and owns streams, so
their C++ threads are still joinable when static destructors run, and the process
aborts with `terminate called without an active exception` (exit -6 after SIGINT, with
or without the other patches: measured on mlx-vlm 0.7.10, mlx 0.32.4 CPU).

How: every ResponseGenerator is remembered (weakly) and an atexit handler calls its own
`stop_and_join()`, so the thread finishes its in-flight requests, releases its streams
and ends before the interpreter finalizes.
"""

import atexit
import logging
import weakref
from types import ModuleType

import wrapt

from ...errors import TargetMissing
from ...registry import Patch

log = logging.getLogger("mlx_threadsafe")
_generators: "weakref.WeakSet" = weakref.WeakSet()
STOP_TIMEOUT_S = 10.0


def _remember(wrapped, instance, args, kwargs):
    wrapped(*args, **kwargs)
    _generators.add(instance)


def _stop_generators_at_exit():
    for generator in list(_generators):
        try:
            generator.stop_and_join(timeout=STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - exiting anyway; say why it could not stop
            log.exception("could not stop the mlx-vlm generation thread at exit")


class StopAtExitPatch(Patch):
    def _apply(self, module: ModuleType) -> None:
        cls = getattr(module, "ResponseGenerator", None)
        if cls is None or not callable(getattr(cls, "stop_and_join", None)):
            raise TargetMissing(f"no ResponseGenerator.stop_and_join in {module.__name__}")
        self.originals.set_attribute(cls, "__init__", wrapt.FunctionWrapper(cls.__init__, _remember))
        atexit.register(_stop_generators_at_exit)
        self.originals.on_restore(lambda: atexit.unregister(_stop_generators_at_exit))


# A thread alive at exit aborts the process whether or not streams are thread-bound.
PATCH = StopAtExitPatch("mlx_vlm.server.stop_at_exit", "mlx-vlm", "mlx_vlm.server.generation",
                        "mlx_vlm.server.generation.ResponseGenerator")
