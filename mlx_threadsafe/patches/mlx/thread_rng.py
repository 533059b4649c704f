"""mlx.thread_rng: each thread draws from its own random key, derived from the process seed.

Since mlx 0.31.2 the default key is per thread and every new thread starts from the
same key, so two worker threads sampling at temperature 1.0 produce the same "random"
text, and ``mx.random.seed()`` on the main thread does not reach them (mlx-lm #1675).

How: when a thread is adopted (its first ``mx.eval`` or its first random draw), it is
seeded with a key derived from the process seed, its name and how many threads of
that name came before; ``mlx_threadsafe.seed(n)`` fixes the process seed. A thread
that calls ``mx.random.seed`` itself keeps its own seed.
"""

from types import ModuleType

import wrapt

from ... import streams
from ..common import thread_adoption

# The functions that draw from the thread's key. A thread can draw before it first
# evaluates anything (mlx-lm 0.25.3-0.26.4 sample the first token of a short prompt
# while still building the graph): seeding at the first eval would come too late.
DRAWING = ("bernoulli", "categorical", "gumbel", "laplace", "multivariate_normal", "normal",
           "permutation", "randint", "truncated_normal", "uniform")


def _remember_explicit_seed(wrapped, instance, args, kwargs):
    # A thread that seeds itself is an MLX thread too: adopt it (for its cleanup)
    # after marking it seeded, so adoption keeps its key.
    streams.mark_seeded()
    streams.adopt_current_thread()
    return wrapped(*args, **kwargs)


class ThreadRngPatch(thread_adoption.AdoptionLayerPatch):
    use = thread_adoption.Use(seed=True)

    def _apply_with_layer(self, mlx_core: ModuleType) -> None:
        random = mlx_core.random
        self.originals.set_attribute(random, "seed", wrapt.FunctionWrapper(random.seed, _remember_explicit_seed))
        for name in DRAWING:
            if hasattr(random, name):
                self.originals.set_attribute(random, name, wrapt.FunctionWrapper(
                    getattr(random, name), thread_adoption.adopt_then_call))


# The random key is per thread from 0.31.2 on every backend (evidence: mlx 0.31.2 CPU).
PATCH = ThreadRngPatch(id="mlx.thread_rng", package="mlx", trigger="mlx.core", target="mlx.core.random",
                       description="each thread draws from its own key")
