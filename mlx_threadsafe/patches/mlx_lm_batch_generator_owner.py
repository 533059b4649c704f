"""mlx_lm.BatchGenerator.owner: every BatchGenerator call runs on the generator's owner thread.

Built on a Worker thread: that worker owns it. Built with an explicit concrete
``stream=`` (``mlx_lm.server`` from 0.31.3): the building thread owns it, calls stay
direct, and a call from any other thread raises a clear error. Otherwise a dedicated
Worker owns it and is closed with it. Calls from several threads are serialized there.
"""

from ..registry import Patch
from .batch_generator import BatchGeneratorOwnerPatch

_owner = BatchGeneratorOwnerPatch(["mlx_lm.generate"])


def apply(package):
    _owner.apply(package)


def revert():
    _owner.revert()


# Two threads stepping one generator crash with or without thread-bound streams.
PATCH = Patch("mlx_lm.BatchGenerator.owner", "mlx-lm", "mlx_lm", apply, revert, needs_thread_bound_streams=False)
