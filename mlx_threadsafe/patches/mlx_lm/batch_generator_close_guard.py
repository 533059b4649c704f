"""mlx_lm.BatchGenerator.close_guard: close() and __del__ never raise off their stream's thread.

On Metal ``close()`` synchronizes the generator's stream, which raises when the garbage
collector runs it on another thread (mlx-lm #1888); only that error is swallowed.
"""

from ..common.batch_generator import CloseGuardPatch

# Metal binds streams from 0.31.2 while the CPU build waits for 0.32.0: the guard is
# cheap, so it goes on wherever the matrix names it rather than by backend.
PATCH = CloseGuardPatch(id="mlx_lm.BatchGenerator.close_guard", package="mlx-lm", homes=["mlx_lm.generate"])
