"""Cross-thread scenarios on real MLX and tiny offline models, each run in a fresh process.

Used by ``mlx-threadsafe doctor``, by the tests and by the compat-matrix harness:

    python -m mlx_threadsafe.scenarios NAME [--shim]

prints one JSON line: {"scenario": NAME, "ok": bool, "detail": str}. A scenario
returns a short detail on success and raises on failure; a crash of the process
(segfault, abort) is reported by the parent from the exit code.

The scenarios live by subject: ``lm``, ``batch``, ``vlm``; ``fakes`` holds the stand-ins
both runs of a scenario get, ``runner`` runs them in fresh processes.
"""

from . import batch, lm, vlm  # noqa: F401  (importing them registers their scenarios)
from .catalogue import DESCRIPTIONS, SCENARIOS, NotApplicable, doctor_scenarios, require, scenario
from .runner import Outcome, main, run_batch, run_in_subprocess

__all__ = ["DESCRIPTIONS", "SCENARIOS", "NotApplicable", "Outcome", "doctor_scenarios", "main", "require",
           "run_batch", "run_in_subprocess", "scenario"]
