"""mlx_lm.BatchGenerator.owner: every BatchGenerator call runs on the generator's owner thread.

The owner rules are `patches.common.batch_generator`'s.
"""

from ..common.batch_generator import BatchGeneratorOwnerPatch

# Two threads stepping one generator crash with or without thread-bound streams.
PATCH = BatchGeneratorOwnerPatch(id="mlx_lm.BatchGenerator.owner", package="mlx-lm", homes=["mlx_lm.generate"],
                                 description="a generator is driven by one owner thread")
