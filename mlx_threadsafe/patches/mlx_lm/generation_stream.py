"""mlx_lm.generation_stream: the module stream made at import becomes per thread (mlx-lm <= 0.31.2).

It lives in ``mlx_lm.utils`` up to 0.22.2, in ``mlx_lm.generate`` after (and, 0.30.6 - 0.31.2,
as a name-imported copy in ``mlx_lm.server``, repointed too).
"""

from ..common.module_stream import GenerationStreamPatch

PATCH = GenerationStreamPatch(id="mlx_lm.generation_stream", package="mlx-lm", trigger="mlx_lm",
                              homes=["mlx_lm.generate", "mlx_lm.utils"])
