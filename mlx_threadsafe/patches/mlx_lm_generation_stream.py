"""mlx_lm.generation_stream: the module stream becomes per thread (mlx-lm <= 0.31.2).

Up to 0.31.2 mlx-lm creates ``generation_stream = mx.new_stream(...)`` when it is
imported, so it belongs to the importing thread and every generation on another
thread fails with ``There is no Stream(..., 0) in current thread``. The global lives
in ``mlx_lm.utils`` up to 0.22.2 and in ``mlx_lm.generate`` after; 0.30.6-0.31.2 also
keep a name-imported copy in ``mlx_lm.server``, repointed too.
"""

from ..registry import Patch
from .generation_stream import GenerationStreamPatch

_stream = GenerationStreamPatch(["mlx_lm.generate", "mlx_lm.utils"])


def apply(package):
    _stream.apply(package)


def revert():
    _stream.revert()


PATCH = Patch("mlx_lm.generation_stream", "mlx-lm", "mlx_lm", apply, revert, _stream.probe)
