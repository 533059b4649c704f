"""mlx.thread_rng: each thread draws from its own random key, derived from the process seed.

From mlx 0.31.2 every new thread starts from the same key, so two threads sampling at
temperature 1.0 draw the same text, and ``mx.random.seed()`` on the main thread does not reach
them (mlx-lm #1675). An adopted thread is seeded from the process seed (``mlx_threadsafe.seed(n)``),
its name and how many threads of that name came before; one that seeds itself keeps its seed.
"""

from types import ModuleType

import wrapt

from ... import streams
from ...patching.per_token import per_token_wrapper
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
        for name in DRAWING:  # a sampler outside mx.compile draws once per token
            if hasattr(random, name):
                self.originals.set_attribute(random, name, per_token_wrapper(getattr(random, name),
                                                                             thread_adoption.adopt_then_call))


# The random key is per thread from 0.31.2 on every backend (evidence: mlx 0.31.2 CPU).
PATCH = ThreadRngPatch(id="mlx.thread_rng", package="mlx", trigger="mlx.core", target="mlx.core.random",
                       description="each thread draws from its own key")
