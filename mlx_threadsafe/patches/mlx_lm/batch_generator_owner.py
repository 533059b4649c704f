"""mlx_lm.BatchGenerator.owner: every BatchGenerator call runs on the generator's owner thread.

Built on a Worker thread: that worker owns it. Built on any other thread: that thread
owns it and its calls from there stay direct, as without the shim (``batch_generate``,
``mlx_lm.server``'s generation thread, a server's scheduler thread). It moves to a
dedicated Worker, closed with it, only when another thread calls it before its builder
stepped it or after its builder ended; otherwise that call raises WrongThread naming
both threads. On a Worker, calls from several threads are serialized.
"""

from ..common.batch_generator import BatchGeneratorOwnerPatch

# Two threads stepping one generator crash with or without thread-bound streams.
PATCH = BatchGeneratorOwnerPatch(id="mlx_lm.BatchGenerator.owner", package="mlx-lm", homes=["mlx_lm.generate"],
                                 description="a generator is driven by one owner thread")
