"""mlx.module_streams: a stream any module makes at import works on every thread.

A module that runs ``S = mx.new_stream(mx.default_device())`` when it is imported
binds ``S`` to the importing thread; ``with mx.stream(S)`` on any other thread
(a request thread, ``asyncio.to_thread``) then fails with ``There is no
Stream(cpu, 0) in current thread``. This patch repoints every concrete ``mx.Stream``
a module holds in its globals once its import has run (and, at install, in every
module already imported) to an ``mx.ThreadLocalStream`` on the same device: one
object that MLX resolves to the calling thread's own stream. Name-imported copies and
default arguments bound to it are repointed too (`rebind_everywhere`), and revert
puts every original back.

A stream made later, inside a function (a thread's own stream), is never touched.
mlx, mlx-lm and mlx-vlm are left to their own, version-gated patches.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import ModuleType
from typing import Any, Dict, List

from ... import import_watch
from ...patching.rebind import rebind_everywhere
from ...registry import Patch

log = logging.getLogger("mlx_threadsafe")

# Packages whose module streams other patches own (or that own streams on purpose).
_LEFT_ALONE = ("mlx", "mlx_lm", "mlx_vlm", "mlx_threadsafe")


def _left_alone(module_name: str) -> bool:
    return module_name.split(".", 1)[0] in _LEFT_ALONE


class ModuleStreamsPatch(Patch):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repointed: Dict[str, int] = {}  # module name -> streams repointed there
        self._lock = threading.Lock()

    def _apply(self, package: ModuleType) -> None:
        # Applied at install(), before mlx may even be imported: the first module that
        # makes a stream at import may be the very one that imports mlx.
        import_watch.watch(self.repoint_streams_of)
        self.originals.on_restore(lambda: import_watch.unwatch(self.repoint_streams_of))
        if "mlx.core" in sys.modules:
            for module in list(sys.modules.values()):
                if isinstance(module, ModuleType):
                    self.repoint_streams_of(module)

    def revert(self) -> None:
        super().revert()
        self.repointed.clear()

    def repoint_streams_of(self, module: ModuleType) -> None:
        name = getattr(module, "__name__", None)
        if not isinstance(name, str) or _left_alone(name):
            return
        found = _concrete_streams(vars(module))
        if not found:
            return
        import mlx.core as mx

        if not hasattr(mx, "new_thread_local_stream"):
            return  # before mlx 0.31.2: streams are not bound to threads anyway
        with self._lock:
            for stream in found:
                if _held_by_left_alone(stream):
                    continue  # a copy of mlx-lm's (or mlx-vlm's) own stream: their patches decide
                replacement = mx.new_thread_local_stream(stream.device)
                unreachable = rebind_everywhere(stream, replacement, self.originals)
                self.repointed[name] = self.repointed.get(name, 0) + 1
                log.debug("%s: module stream %s is now per thread (%d repointed in total; %d copies left: %s)",
                          name, stream, sum(self.repointed.values()), len(unreachable), unreachable)


def _held_by_left_alone(stream: Any) -> bool:
    return any(value is stream
               for name, module in list(sys.modules.items()) if _left_alone(name) and isinstance(module, ModuleType)
               for value in list(vars(module).values()))


def _concrete_streams(namespace: Dict[str, Any]) -> List[Any]:
    stream_type = getattr(sys.modules.get("mlx.core"), "Stream", None)
    if stream_type is None:
        return []
    found: List[Any] = []
    for value in list(namespace.values()):
        if isinstance(value, stream_type) and not any(value is seen for seen in found):
            found.append(value)
    return found


# Triggered by this package itself: it applies at install(), whatever is imported yet.
PATCH = ModuleStreamsPatch("mlx.module_streams", "mlx", "mlx_threadsafe", "mx.Stream globals of every module",
                           needs_thread_bound_streams=True)
