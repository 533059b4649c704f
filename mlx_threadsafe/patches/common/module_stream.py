"""A module's ``generation_stream``, made at import, becomes one stream per thread.

A module global cannot be made per thread from outside (functions read it straight
from the module ``__dict__``), so the replacement is an ``mx.ThreadLocalStream``:
one object that MLX resolves to the calling thread's own stream each time it is used.
Every name-imported copy and default argument bound to the original is repointed too.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional, Sequence

from ...errors import MlxThreadsafeWarning, TargetMissing
from ...patching.homes import home_of
from ...patching.rebind import rebind_everywhere
from ...registry import Patch


class GenerationStreamPatch(Patch):
    def __init__(self, *, homes: Sequence[str], **fields) -> None:
        super().__init__(target=f"{homes[0]}.generation_stream", description="one generation stream per thread",
                         needs_thread_bound_streams=True, **fields)
        self.homes = list(homes)  # modules that define generation_stream, newest layout first

    def probe(self, module: ModuleType) -> Optional[str]:
        import mlx.core as mx

        if isinstance(home_of("generation_stream", self.homes).generation_stream,
                      getattr(mx, "ThreadLocalStream", ())):
            return "generation_stream is already an mx.ThreadLocalStream"
        return None

    def _apply(self, module: ModuleType) -> None:
        import mlx.core as mx

        home = home_of("generation_stream", self.homes)
        original = home.generation_stream
        not_needed = self.probe(module)
        if not_needed:
            raise TargetMissing(f"{home.__name__}: {not_needed}")
        if not isinstance(original, mx.Stream):
            raise TargetMissing(f"{home.__name__}.generation_stream is a {type(original).__name__}")
        if not hasattr(mx, "new_thread_local_stream"):
            raise TargetMissing(f"mlx {getattr(mx, '__version__', '?')} has no new_thread_local_stream")
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
