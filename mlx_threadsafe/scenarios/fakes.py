"""Stand-ins that let the CPU build take the paths releases and Metal take: both runs of a scenario get them."""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, List


@contextlib.contextmanager
def _non_metal_wired_limit(model, streams=None):
    yield


def let_old_releases_generate_on_linux(module_names) -> None:
    """Give releases whose wired_limit is Metal-only the non-Metal branch later ones have.

    mlx-lm up to 0.25.2 and mlx-vlm 0.1.22 - 0.3.x read Metal's working-set size
    unconditionally, so on Linux every generate() dies with KeyError before any thread
    matters. Replaced in both runs of a scenario (with and without the shim), so the
    comparison stays fair.
    """
    import mlx.core as mx

    if mx.metal.is_available():
        return
    # Only modules the package imported itself: importing mlx_lm.generate by hand on
    # mlx-lm <= 0.22.2 would shadow the generate() function with the CLI module.
    for module_name in module_names:
        module: Any = sys.modules.get(module_name)
        wired_limit = vars(module).get("wired_limit") if module is not None else None
        if wired_limit is None or wired_limit is _non_metal_wired_limit:
            continue
        # The generator body under contextmanager (and under the shim's close guard, if any).
        code = getattr(inspect.unwrap(wired_limit), "__code__", None)
        if code is not None and "is_available" not in code.co_names:
            module.wired_limit = _non_metal_wired_limit



class MetalLikeClose:
    """Makes the CPU build take Metal's paths through a generator's wired limit and close().

    On CPU and CUDA, close() syncs nothing; on Metal it synchronizes the generator's
    stream, which raises from any thread but the stream's own. Records the wired limits
    set, so a test can see the limit restored. Everything is put back on exit, since
    later scenarios run in the same process.
    """

    def __enter__(self) -> "MetalLikeClose":
        import mlx.core as mx

        self.limits: List[int] = []
        self.unraisable: List[str] = []
        self._saved = [(mx, "synchronize", mx.synchronize), (mx, "set_wired_limit", mx.set_wired_limit),
                       (mx, "device_info", getattr(mx, "device_info", None)),
                       (mx.metal, "is_available", mx.metal.is_available),
                       (mx.metal, "device_info", getattr(mx.metal, "device_info", None)),
                       (sys, "unraisablehook", sys.unraisablehook)]
        real_synchronize, real_set_wired_limit = mx.synchronize, mx.set_wired_limit

        def synchronize(stream=None):
            if stream is not None and isinstance(stream, mx.Stream) and stream != mx.default_stream(stream.device):
                raise RuntimeError(f"There is no {stream} in current thread.".replace("cpu", "gpu"))
            return real_synchronize() if stream is None else real_synchronize(stream)

        def set_wired_limit(limit):
            self.limits.append(limit)
            return real_set_wired_limit(limit)

        metal_info = {"max_recommended_working_set_size": 1 << 34, "memory_size": 1 << 35}
        mx.synchronize, mx.set_wired_limit = synchronize, set_wired_limit
        mx.metal.is_available = lambda: True
        mx.device_info = mx.metal.device_info = lambda *args: dict(metal_info)  # type: ignore[assignment]
        sys.unraisablehook = lambda info: self.unraisable.append(f"{info.exc_type.__name__}: {info.exc_value}")
        return self

    def __exit__(self, *exc_info) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


