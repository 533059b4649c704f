"""One module per patched target; ALL is the order install() applies them in."""

from . import (
    mlx_compile_random_state,
    mlx_lm_batch_generator_close_guard,
    mlx_lm_batch_generator_owner,
    mlx_lm_detokenizer,
    mlx_lm_generation_stream,
    mlx_lm_load,
    mlx_module_streams,
    mlx_thread_cleanup,
    mlx_thread_rng,
    mlx_vlm_batch_generator_close_guard,
    mlx_vlm_batch_generator_owner,
    mlx_vlm_generation_stream,
    mlx_vlm_load,
    mlx_vlm_request_state,
    mlx_vlm_server_generation,
)

ALL = [
    mlx_thread_cleanup.PATCH,
    mlx_thread_rng.PATCH,
    mlx_compile_random_state.PATCH,
    mlx_module_streams.PATCH,
    mlx_lm_generation_stream.PATCH,
    mlx_lm_load.PATCH,
    mlx_lm_detokenizer.PATCH,
    mlx_lm_batch_generator_owner.PATCH,
    mlx_lm_batch_generator_close_guard.PATCH,
    mlx_vlm_generation_stream.PATCH,
    mlx_vlm_load.PATCH,
    mlx_vlm_batch_generator_owner.PATCH,
    mlx_vlm_batch_generator_close_guard.PATCH,
    mlx_vlm_request_state.PATCH,
    mlx_vlm_server_generation.PATCH,
]
