"""mlx_vlm.BatchGenerator.owner: every BatchGenerator call runs on the generator's owner thread.

mlx-vlm's BatchGenerator (0.3.10+) has the shape of mlx-lm's: once stepped on one
thread its batch state is lazy work bound to that thread, and two threads stepping it
at once corrupt it. The same owner rules apply (see `mlx_lm.BatchGenerator.owner`);
``mlx_vlm.server`` builds its generator on its generation thread with that thread's
stream, so the server keeps direct calls. Arrays handed to a call that hops to the
owner (``insert(prompt_kwargs=[{"inputs_embeds": ...}])``) are evaluated on the caller
first, since lazy ones belong to the caller's stream.
"""

from ..common.batch_generator import BatchGeneratorOwnerPatch

# 0.6.0+ keeps the class in mlx_vlm/generate/ar.py; 0.3.10-0.5.0 in mlx_vlm/generate.py.
PATCH = BatchGeneratorOwnerPatch(id="mlx_vlm.BatchGenerator.owner", package="mlx-vlm",
                                 homes=["mlx_vlm.generate.ar", "mlx_vlm.generate"],
                                 description="a generator is driven by one owner thread")
