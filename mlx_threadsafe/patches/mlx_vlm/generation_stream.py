"""mlx_vlm.generation_stream: the module stream made at import becomes per thread (mlx-vlm 0.1.22 - 0.4.4).

It lives in ``mlx_vlm.utils`` up to 0.2.0, in ``mlx_vlm.generate`` after (mlx-vlm #1049, #1134).
"""

from ..common.module_stream import GenerationStreamPatch

PATCH = GenerationStreamPatch(id="mlx_vlm.generation_stream", package="mlx-vlm", trigger="mlx_vlm",
                              homes=["mlx_vlm.generate", "mlx_vlm.utils"])
