"""mlx_lm.generation_stream: the module stream becomes per thread (mlx-lm <= 0.31.2).

Up to 0.31.2 mlx-lm creates ``generation_stream = mx.new_stream(...)`` when it is
imported, so it belongs to the importing thread and every generation on another
thread fails with ``There is no Stream(..., 0) in current thread``. The global lives
in ``mlx_lm.utils`` up to 0.22.2 and in ``mlx_lm.generate`` after; 0.30.6-0.31.2 also
keep a name-imported copy in ``mlx_lm.server``, repointed too.
"""

from ..common.module_stream import GenerationStreamPatch

PATCH = GenerationStreamPatch(id="mlx_lm.generation_stream", package="mlx-lm", trigger="mlx_lm",
                              homes=["mlx_lm.generate", "mlx_lm.utils"])
