"""Every patch, one module per patch id: ``patches/<package>/<target>_<what>.py``.

``mlx.thread_rng`` lives in ``patches/mlx/thread_rng.py``, ``mlx_lm.load.materialize``
in ``patches/mlx_lm/load_materialize.py``. Each module declares one ``PATCH`` (a
`mlx_threadsafe.registry.Patch`); the kinds of patch several targets share are in
``patches/common/``. ALL is the order install() plans them in (uninstall() reverts in
reverse): derived from each patch's ``requires``, the listed order breaking ties.
"""

from graphlib import TopologicalSorter

from .mlx import (
    compile_random_state,
    cuda_capture_gate,
    cuda_graph_capture,
    distributed_one_thread,
    module_streams,
    thread_cleanup,
    thread_rng,
)
from .mlx_lm import batch_generator_close_guard as lm_batch_generator_close_guard
from .mlx_lm import batch_generator_owner as lm_batch_generator_owner
from .mlx_lm import generation_stream as lm_generation_stream
from .mlx_lm import load_materialize as lm_load_materialize
from .mlx_lm import server_stop_at_exit as lm_server_stop_at_exit
from .mlx_lm import stream_generate_batch as lm_stream_generate_batch
from .mlx_lm import tokenizer_wrapper_detokenizer
from .mlx_vlm import batch_generator_close_guard as vlm_batch_generator_close_guard
from .mlx_vlm import batch_generator_owner as vlm_batch_generator_owner
from .mlx_vlm import generate_step_request_state
from .mlx_vlm import generation_stream as vlm_generation_stream
from .mlx_vlm import load_materialize as vlm_load_materialize
from .mlx_vlm import server_stop_at_exit as vlm_server_stop_at_exit

_LISTED = [
    thread_cleanup.PATCH,
    thread_rng.PATCH,
    compile_random_state.PATCH,
    module_streams.PATCH,
    distributed_one_thread.PATCH,
    cuda_graph_capture.PATCH,
    cuda_capture_gate.PATCH,
    lm_generation_stream.PATCH,
    lm_load_materialize.PATCH,
    tokenizer_wrapper_detokenizer.PATCH,
    lm_batch_generator_owner.PATCH,
    lm_batch_generator_close_guard.PATCH,
    lm_server_stop_at_exit.PATCH,
    lm_stream_generate_batch.PATCH,
    vlm_generation_stream.PATCH,
    vlm_load_materialize.PATCH,
    vlm_batch_generator_owner.PATCH,
    vlm_batch_generator_close_guard.PATCH,
    generate_step_request_state.PATCH,
    vlm_server_stop_at_exit.PATCH,
]



def in_dependency_order(patches):
    """`patches` in their listed order, except that each comes after those it requires (graphlib: no cycles)."""
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


ALL = in_dependency_order(_LISTED)


def by_id(patch_id: str):
    """The patch with this id; KeyError names the known ids."""
    for patch in ALL:
        if patch.id == patch_id:
            return patch
    raise KeyError(f"no patch {patch_id!r}; known: {', '.join(p.id for p in ALL)}")
