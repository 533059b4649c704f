"""mlx_lm.BatchGenerator.close_guard: close()/__del__ never raise off their stream's thread.

``close()`` runs ``mx.synchronize(stream)`` when a wired limit was set (Metal); run by
the garbage collector on another thread it raises ``There is no Stream(gpu, N) in
current thread`` (mlx-lm #1888, PR #1890 unmerged). Only that error is swallowed;
``__del__`` never raises.
"""

from ..common.batch_generator import CloseGuardPatch

# Metal binds streams from 0.31.2 while the CPU build waits for 0.32.0: the guard is
# cheap, so it goes on wherever the matrix names it rather than by backend.
PATCH = CloseGuardPatch(id="mlx_lm.BatchGenerator.close_guard", package="mlx-lm", homes=["mlx_lm.generate"])
