"""mlx_lm.TokenizerWrapper.detokenizer: each caller gets its own streaming detokenizer.

Up to 0.27.1 ``TokenizerWrapper`` hands one streaming detokenizer to every
``stream_generate``, so two threads generating with one tokenizer get each other's
text. From 0.28.0 the property returns a fresh one per access; this gives older releases the same.
"""

from types import ModuleType
from typing import Optional

from ...errors import TargetMissing
from ...registry import Patch


def _fresh_detokenizer(wrapper):
    # What 0.28.0+ does: a copy of the configured detokenizer whose reset() gives it
    # state of its own. A plain __dict__ copy: copy.copy trips over the read-only
    # `text` property some of these releases define.
    shared = wrapper._detokenizer
    detokenizer = object.__new__(type(shared))
    vars(detokenizer).update(vars(shared))
    detokenizer.reset()
    return detokenizer


def _already_per_caller(cls) -> bool:
    return isinstance(vars(cls).get("detokenizer"), property)


class DetokenizerPerCallerPatch(Patch):
    def probe(self, module: ModuleType) -> Optional[str]:
        cls = getattr(module, "TokenizerWrapper", None)
        if cls is not None and _already_per_caller(cls):
            return "this release already gives each caller its own detokenizer"
        return None

    def _apply(self, module: ModuleType) -> None:
        cls = getattr(module, "TokenizerWrapper", None)
        if cls is None or "_detokenizer" not in cls.__init__.__code__.co_names:
            raise TargetMissing(f"no TokenizerWrapper holding a _detokenizer in {module.__name__}")
        # A class property wins over the __getattr__ that returned the shared instance.
        self.originals.set_attribute(cls, "detokenizer", property(_fresh_detokenizer))


# A plain Python data race: it corrupts text whether or not streams are thread-bound.
PATCH = DetokenizerPerCallerPatch(id="mlx_lm.TokenizerWrapper.detokenizer", package="mlx-lm",
                                  trigger="mlx_lm.tokenizer_utils",
                                  target="mlx_lm.tokenizer_utils.TokenizerWrapper.detokenizer",
                                  description="one streaming detokenizer per caller")
