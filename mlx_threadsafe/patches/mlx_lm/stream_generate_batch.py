"""mlx_lm.stream_generate.batch: concurrent stream_generate calls on one model join one batch (opt-in).

Applied wherever the matrix names it, but it does nothing until the batch mode is on
(``install(batch=True)``, ``MLX_THREADSAFE_BATCH=1``, the plugin's
``--mlx-threadsafe-batch``): off, the wrapper hands every call to the original
``stream_generate`` and returns its own generator. On, see `mlx_threadsafe.batching`.

``mlx_lm.generate`` (the function) looks ``stream_generate`` up in its module, so it is
routed too; the name-imported copies (``mlx_lm.stream_generate``, ``mlx_lm.chat``,
``mlx_lm.server`` when imported already) are repointed. The batch relies on the
BatchGenerator API of mlx-lm 0.31.2+ (``insert(prompts, max_tokens=, samplers=,
logits_processors=)``, ``remove(uids)``, ``next()`` with ``Response.uid/token/logprobs/
finish_reason``); a release without it reports the patch skipped.
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType

import wrapt

from ... import batching
from ...errors import TargetMissing
from ...registry import Patch

_HOME = "mlx_lm.generate"
_INSERT_KEYWORDS = ("max_tokens", "samplers", "logits_processors")


class StreamGenerateBatchPatch(Patch):
    opt_in = True  # a pass-through until the batch mode is on (compat_matrix.verify needs no evidence)

    def _apply(self, module: ModuleType) -> None:
        home = sys.modules.get(_HOME)
        original = vars(home).get("stream_generate") if home is not None else None
        generator_class = vars(home).get("BatchGenerator") if home is not None else None
        if original is None or generator_class is None:
            raise TargetMissing(f"{_HOME} has no stream_generate or no BatchGenerator")
        parameters = inspect.signature(generator_class.insert).parameters
        missing = [name for name in _INSERT_KEYWORDS if name not in parameters]
        if missing or not hasattr(generator_class, "remove"):
            raise TargetMissing(f"BatchGenerator.insert takes no {', '.join(missing) or 'remove'} here")
        wrapper = wrapt.FunctionWrapper(original, batching.route)
        self.originals.set_attribute(home, "stream_generate", wrapper)
        for name, other in list(sys.modules.items()):
            if (name == "mlx_lm" or name.startswith("mlx_lm.")) and other is not home \
                    and vars(other).get("stream_generate") is original:
                self.originals.set_attribute(other, "stream_generate", wrapper)
        batching.set_applied(True, moves_in="caches" in parameters and "all_tokens" in parameters)
        # A copy name-imported after install() (mlx_lm.chat imported later) keeps the wrapper
        # after uninstall(): it passes every call through from now on.
        self.originals.on_restore(lambda: batching.set_applied(False))


PATCH = StreamGenerateBatchPatch(id="mlx_lm.stream_generate.batch", package="mlx-lm", trigger="mlx_lm",
                                 target="mlx_lm.generate.stream_generate",
                                 description="concurrent calls on one model join one batch (opt-in)")
