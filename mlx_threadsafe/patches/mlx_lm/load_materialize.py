"""mlx_lm.load.materialize: a loaded model has no lazy state left (all mlx-lm releases).

``load_model`` evaluates only ``model.parameters()``: ``_``-prefixed arrays such as
``Llama3RoPE._freqs`` and adapters from ``load_adapters`` stay lazy, bound to the loading thread.
"""

from ..common.load_materialize import LoadMaterializePatch

PATCH = LoadMaterializePatch(id="mlx_lm.load.materialize", package="mlx-lm", trigger="mlx_lm", targets=[
    ("mlx_lm.utils", "load"),
    ("mlx_lm.utils", "load_model"),
    ("mlx_lm.utils", "load_adapters"),
    ("mlx_lm.tuner.utils", "load_adapters"),
    ("mlx_lm.utils", "sharded_load"),
])
