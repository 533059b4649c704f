"""mlx_vlm.BatchGenerator.owner: every BatchGenerator call runs on the generator's owner thread (0.3.10+).

The owner rules are `patches.common.batch_generator`'s; ``mlx_vlm.server`` builds its generator
on its generation thread, so the server's own calls stay direct.
"""

from ..common.batch_generator import BatchGeneratorOwnerPatch

# 0.6.0+ keeps the class in mlx_vlm/generate/ar.py; 0.3.10-0.5.0 in mlx_vlm/generate.py.
PATCH = BatchGeneratorOwnerPatch(id="mlx_vlm.BatchGenerator.owner", package="mlx-vlm",
                                 homes=["mlx_vlm.generate.ar", "mlx_vlm.generate"],
                                 description="a generator is driven by one owner thread")
