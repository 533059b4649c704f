"""mlx_vlm.BatchGenerator.close_guard: close() and __del__ never raise off their stream's thread.

From 0.5.0 ``close()`` leaves ``wired_limit(model, [stream])``, whose exit synchronizes the
stream on Metal: run by the garbage collector on another thread it raises and the wired
limit is never restored. Off the entering thread the guard skips that sync (and still restores the limit).
"""

from ..common.batch_generator import CloseGuardPatch

# Metal binds streams from mlx 0.31.2, whatever the CPU build does.
PATCH = CloseGuardPatch(id="mlx_vlm.BatchGenerator.close_guard", package="mlx-vlm",
                        homes=["mlx_vlm.generate.ar", "mlx_vlm.generate"])
