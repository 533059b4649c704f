"""mlx_vlm.generation_stream: the module stream becomes per thread (mlx-vlm 0.1.22-0.4.4).

Those releases create ``generation_stream = mx.new_stream(...)`` at import
(``mlx_vlm/utils.py`` up to 0.2.0, ``mlx_vlm/generate.py`` 0.3.0-0.4.4), so any
``generate()`` off the importing thread fails (mlx-vlm #1049, #1134).
"""

from ..common.module_stream import GenerationStreamPatch

PATCH = GenerationStreamPatch(id="mlx_vlm.generation_stream", package="mlx-vlm", trigger="mlx_vlm",
                              homes=["mlx_vlm.generate", "mlx_vlm.utils"])
