"""Every patch, one module per patch id: ``patches/<package>/<target>_<what>.py``.

``mlx.thread_rng`` lives in ``patches/mlx/thread_rng.py``, ``mlx_lm.load.materialize``
in ``patches/mlx_lm/load_materialize.py``. Each module declares one ``PATCH`` (a
`mlx_threadsafe.registry.Patch`); the kinds of patch several targets share are in
``patches/common/``. ALL is the order install() plans them in (uninstall() reverts in
reverse): derived from each patch's ``requires``, the listed order breaking ties.

CATALOGUE declares the same patches as data, in ALL's order (tests/test_startup_catalogue.py
holds it to the modules' PATCH objects): install() imports the module of a patch only when the
options and the matrix leave it on, so a process pays for the patches its releases need.
"""

import importlib
from collections import namedtuple

# A patch as install() knows it before importing its module: what its status row and the
# matrix need (`module`: its module under this package).
Declared = namedtuple("Declared", "id package trigger target module")

CATALOGUE = (
    Declared("mlx.thread_cleanup", "mlx", "mlx.core", "mlx.core.eval", "mlx.thread_cleanup"),
    Declared("mlx.thread_rng", "mlx", "mlx.core", "mlx.core.random", "mlx.thread_rng"),
    Declared("mlx.compile.random_state", "mlx", "mlx.core", "mlx.core.compile", "mlx.compile_random_state"),
    Declared("mlx.module_streams", "mlx", "mlx.core", "mlx.core.stream", "mlx.module_streams"),
    Declared("mlx.distributed.one_thread", "mlx", "mlx.core", "mlx.core.distributed", "mlx.distributed_one_thread"),
    Declared("mlx.cuda_graph_capture", "mlx", "mlx.core", "os.environ.MLX_USE_CUDA_GRAPHS",
             "mlx.cuda_graph_capture"),
    Declared("mlx.cuda_capture_gate", "mlx", "mlx.core", "mlx.core.async_eval", "mlx.cuda_capture_gate"),
    Declared("mlx_lm.generation_stream", "mlx-lm", "mlx_lm", "mlx_lm.generate.generation_stream",
             "mlx_lm.generation_stream"),
    Declared("mlx_lm.load.materialize", "mlx-lm", "mlx_lm", "mlx_lm.utils.load", "mlx_lm.load_materialize"),
    Declared("mlx_lm.TokenizerWrapper.detokenizer", "mlx-lm", "mlx_lm.tokenizer_utils",
             "mlx_lm.tokenizer_utils.TokenizerWrapper.detokenizer", "mlx_lm.tokenizer_wrapper_detokenizer"),
    Declared("mlx_lm.BatchGenerator.owner", "mlx-lm", "mlx_lm", "mlx_lm.generate.BatchGenerator",
             "mlx_lm.batch_generator_owner"),
    Declared("mlx_lm.BatchGenerator.close_guard", "mlx-lm", "mlx_lm", "mlx_lm.generate.BatchGenerator.close",
             "mlx_lm.batch_generator_close_guard"),
    Declared("mlx_lm.server.stop_at_exit", "mlx-lm", "mlx_lm", "mlx_lm.server.ResponseGenerator",
             "mlx_lm.server_stop_at_exit"),
    Declared("mlx_lm.stream_generate.batch", "mlx-lm", "mlx_lm", "mlx_lm.generate.stream_generate",
             "mlx_lm.stream_generate_batch"),
    Declared("mlx_vlm.generation_stream", "mlx-vlm", "mlx_vlm", "mlx_vlm.generate.generation_stream",
             "mlx_vlm.generation_stream"),
    Declared("mlx_vlm.load.materialize", "mlx-vlm", "mlx_vlm", "mlx_vlm.utils.load", "mlx_vlm.load_materialize"),
    Declared("mlx_vlm.BatchGenerator.owner", "mlx-vlm", "mlx_vlm", "mlx_vlm.generate.ar.BatchGenerator",
             "mlx_vlm.batch_generator_owner"),
    Declared("mlx_vlm.BatchGenerator.close_guard", "mlx-vlm", "mlx_vlm", "mlx_vlm.generate.ar.BatchGenerator.close",
             "mlx_vlm.batch_generator_close_guard"),
    Declared("mlx_vlm.generate_step.request_state", "mlx-vlm", "mlx_vlm", "mlx_vlm.generate.generate_step",
             "mlx_vlm.generate_step_request_state"),
    Declared("mlx_vlm.server.stop_at_exit", "mlx-vlm", "mlx_vlm.server.generation",
             "mlx_vlm.server.generation.ResponseGenerator", "mlx_vlm.server_stop_at_exit"),
)


ALL: list  # every PATCH in planning order, made on first use (__getattr__)


def load(declared: Declared):
    """The PATCH of a declared patch's module (imported now, if it was not)."""
    return importlib.import_module(f"{__name__}.{declared.module}").PATCH


def __getattr__(name: str):
    # ALL imports every patch module: built on first use (tests, the harnesses), not by install().
    if name == "ALL":
        global ALL
        ALL = in_dependency_order(_listed())
        return ALL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _listed():
    """Every PATCH, in the order the patches are listed here (ties in ALL's order break by it)."""
    return [load(declared) for declared in CATALOGUE]


def in_dependency_order(patches):
    """`patches` in their listed order, except that each comes after those it requires (graphlib: no cycles)."""
    from graphlib import TopologicalSorter

    listed = {patch.id: index for index, patch in enumerate(patches)}
    sorter = TopologicalSorter({patch.id: patch.requires for patch in patches})
    sorter.prepare()
    ready: list = []
    ordered = []
    while sorter.is_active():
        ready = sorted(ready + list(sorter.get_ready()), key=listed.__getitem__)
        first = ready.pop(0)
        ordered.append(patches[listed[first]])
        sorter.done(first)
    return ordered


def by_id(patch_id: str):
    """The patch with this id (its module alone imported); KeyError names the known ids."""
    for declared in CATALOGUE:
        if declared.id == patch_id:
            return load(declared)
    raise KeyError(f"no patch {patch_id!r}; known: {', '.join(d.id for d in CATALOGUE)}")
