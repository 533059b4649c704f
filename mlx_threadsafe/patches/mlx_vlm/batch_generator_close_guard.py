"""mlx_vlm.BatchGenerator.close_guard: close()/__del__ never raise off their stream's thread.

From 0.5.0 mlx-vlm's BatchGenerator enters ``wired_limit(model, [stream])`` in
``__init__`` and leaves it in ``close()`` (``__del__`` calls ``close()``); on Metal the
exit synchronizes the generator's stream, which raises ``There is no Stream(gpu, N) in
current thread`` when the garbage collector runs it on another thread, and the wired
limit is then never restored. The guard skips that sync off the entering thread (the
limit is still restored), swallows only that error in ``close()``, and keeps
``__del__`` from raising.
"""

from ..common.batch_generator import CloseGuardPatch

# Metal binds streams from mlx 0.31.2, whatever the CPU build does.
PATCH = CloseGuardPatch(id="mlx_vlm.BatchGenerator.close_guard", package="mlx-vlm",
                        homes=["mlx_vlm.generate.ar", "mlx_vlm.generate"])
