"""mlx.cuda_graph_capture (opt-in): no CUDA stream capture for another thread's CUDA calls to break.

On CUDA, MLX records cuBLAS matmuls into its graphs by stream capture, which a device-wide call
from another thread invalidates: the process aborts (``cudaStreamEndCapture ... failed``). With
``MLX_THREADSAFE_CUDA_GRAPHS=off`` the patch sets ``MLX_USE_CUDA_GRAPHS=0`` when mlx.core is
imported (MLX reads it at its first GPU operation), so nothing is captured; it leaves a value the
program set alone, and revert() restores the variable. Why it is opt-in: docs/how-it-works.md.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Optional

from ...registry import Patch

log = logging.getLogger("mlx_threadsafe")

VARIABLE = "MLX_USE_CUDA_GRAPHS"
SWITCH = "MLX_THREADSAFE_CUDA_GRAPHS"  # "off": turn MLX's CUDA graphs (and stream capture) off

_UNSET = object()


class CudaGraphCapturePatch(Patch):
    def __init__(self, **fields) -> None:
        super().__init__(**fields)
        self._previous: object = _UNSET  # what VARIABLE held before apply; _UNSET: nothing to undo
        self.effect: Optional[str] = None  # what apply did, for status and tests

    def _apply(self, mlx_core: ModuleType) -> None:
        # planning has checked the backend and the opt-in.
        if VARIABLE in os.environ:
            self.effect = f"left {VARIABLE}={os.environ[VARIABLE]!r} as the program set it"
        else:
            self._previous = None
            os.environ[VARIABLE] = "0"
            self.effect = f"set {VARIABLE}=0"
        log.debug("mlx.cuda_graph_capture: %s", self.effect)

    def revert(self) -> None:
        if self._previous is not _UNSET:
            if os.environ.get(VARIABLE) == "0":  # ours, unless someone changed it since
                if self._previous is None:
                    os.environ.pop(VARIABLE, None)
                else:
                    os.environ[VARIABLE] = str(self._previous)
            self._previous = _UNSET
        self.effect = None
        super().revert()


# CUDA graphs (and capture) are in every mlx-cuda release the matrix covers. Opt-in: it costs
# single-thread speed (benchmarks/cuda_capture/RESULTS.md).
PATCH = CudaGraphCapturePatch(id="mlx.cuda_graph_capture", package="mlx", trigger="mlx.core",
                              target="os.environ.MLX_USE_CUDA_GRAPHS",
                              description="MLX's CUDA graphs off: no stream capture to abort",
                              backends=["cuda"], enabled_by=(SWITCH, "off"))
