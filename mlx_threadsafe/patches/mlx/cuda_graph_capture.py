"""mlx.cuda_graph_capture (opt-in): no CUDA stream capture for another thread's CUDA calls to break.

On the CUDA backend MLX records each thread's work into a CUDA graph and records cuBLAS
matmuls (and cuDNN, cuFFT and NCCL calls) into it by stream capture (ml-explore/mlx
``mlx/backend/cuda/device.cpp``: ``CommandEncoder::CaptureContext`` begins with
``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)`` and its destructor
calls ``CudaGraph::end_capture``, ``utils.cpp``, which throws; ``cublas_utils.cpp`` wraps
``cublasLtMatmul`` in it; decode steps with one row use MLX's own gemv and capture
nothing, so the window is the prefill). The thread-local mode only forbids the capturing
thread's own unsafe calls; a device-wide call made meanwhile by another thread of the
process on the same GPU (synchronizing calls such as ``cudaFree``, and the per-thread
cuBLAS/cuDNN handle and stream creation and teardown MLX does when a thread first uses
the GPU or ends) still invalidates the capture. The exception leaves a destructor: the
process aborts with ``cudaStreamEndCapture(stream, &handle_) failed: operation failed due
to a previous error during capture`` (SIGABRT), now and then, with or without the shim
(issue 29; rates in benchmarks/cuda_capture/RESULTS.md).

How: MLX honours ``MLX_USE_CUDA_GRAPHS``, read once at the first GPU operation of the
process (a function-local static, ``use_cuda_graphs()`` in ``device.cpp``; not at import).
At 0 MLX launches each kernel and each cuBLAS call directly on the thread's stream:
nothing is captured, so nothing can be invalidated (0 capture aborts in 60 runs of 8
threads on an H200, against 3 in 60 without). It costs single-thread speed: about 17%
on a 2048-wide 8-layer bf16 model on that H200. So it is opt-in:
``MLX_THREADSAFE_CUDA_GRAPHS=off`` makes the patch set ``MLX_USE_CUDA_GRAPHS=0`` when
mlx.core is imported (``MLX_THREADSAFE=1``, or ``install()`` before the first GPU
evaluation, are in time). Without it, or where the program set ``MLX_USE_CUDA_GRAPHS``
itself, the patch changes nothing and says so. On other backends there are no CUDA
graphs: it reports itself skipped. revert() restores the variable (which matters only
before MLX has read it).
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


# CUDA graphs (and capture) are in every mlx-cuda release the matrix covers. Opt-in: about
# 17% slower on one thread (benchmarks/cuda_capture/RESULTS.md).
PATCH = CudaGraphCapturePatch(id="mlx.cuda_graph_capture", package="mlx", trigger="mlx.core",
                              target="os.environ.MLX_USE_CUDA_GRAPHS",
                              description="MLX's CUDA graphs off: no stream capture to abort",
                              backends=["cuda"], enabled_by=(SWITCH, "off"))
