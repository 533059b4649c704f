"""mlx_vlm.generation_stream: the module stream becomes per thread (mlx-vlm 0.1.22-0.4.4).

Those releases create ``generation_stream = mx.new_stream(...)`` at import
(``mlx_vlm/utils.py`` up to 0.2.0, ``mlx_vlm/generate.py`` 0.3.0-0.4.4), so any
``generate()`` off the importing thread fails (mlx-vlm #1049, #1134).
"""

from ..registry import Patch
from .generation_stream import GenerationStreamPatch

_stream = GenerationStreamPatch(["mlx_vlm.generate", "mlx_vlm.utils"])


def apply(package):
    _stream.apply(package)


def revert():
    _stream.revert()


PATCH = Patch("mlx_vlm.generation_stream", "mlx-vlm", "mlx_vlm", apply, revert, _stream.probe)
