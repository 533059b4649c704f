"""What the two generation_stream patches share: find the module stream, replace it.

A module global cannot be made per thread from outside (functions read it straight
from the module ``__dict__``), so the replacement is an ``mx.ThreadLocalStream``:
one object that MLX resolves to the calling thread's own stream each time it is used.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Sequence

from ..originals import Originals
from ..registry import MlxThreadsafeWarning, TargetMissing
from .rebind import rebind_everywhere


class GenerationStreamPatch:
    def __init__(self, homes: Sequence[str]) -> None:
        self.homes = list(homes)  # modules that define generation_stream, newest layout first
        self.originals = Originals()

    def home(self):
        for name in self.homes:
            module = sys.modules.get(name)
            if module is not None and "generation_stream" in vars(module):
                return module
        raise TargetMissing(f"no generation_stream in {', '.join(self.homes)}")

    def probe(self, package) -> Optional[str]:
        import mlx.core as mx

        if isinstance(self.home().generation_stream, getattr(mx, "ThreadLocalStream", ())):
            return "generation_stream is already an mx.ThreadLocalStream"
        return None

    def apply(self, package) -> None:
        import mlx.core as mx

        home = self.home()
        original = home.generation_stream
        not_needed = self.probe(package)
        if not_needed:
            raise TargetMissing(f"{home.__name__}: {not_needed}")
        if not isinstance(original, mx.Stream):
            raise TargetMissing(f"{home.__name__}.generation_stream is a {type(original).__name__}")
        if not hasattr(mx, "new_thread_local_stream"):
            raise TargetMissing(f"mlx {mx.__version__} has no new_thread_local_stream")
        replacement = mx.new_thread_local_stream(original.device)
        unreachable = rebind_everywhere(original, replacement, self.originals)
        if unreachable:
            warnings.warn(
                f"mlx_threadsafe: {len(unreachable)} copies of {home.__name__}.generation_stream could not "
                f"be repointed ({'; '.join(sorted(set(unreachable)))}); code that uses them still runs on "
                "the importing thread's stream. Read the module attribute at call time instead.",
                MlxThreadsafeWarning,
                stacklevel=2,
            )

    def revert(self) -> None:
        self.originals.restore()
