"""Scenario (a): sharded load on the main thread, greedy generate on another thread.

    rank_sharded_generate.py MODEL_DIR [--install] [--pipeline] [--max-tokens N] [--reference]

Under mlx.launch: `mlx_lm.utils.sharded_load` (tensor parallel; `--pipeline`: pipeline) on
the main thread, then `stream_generate` at temperature 0 on a new thread. `--reference`
(run as a plain process, no launcher): `mlx_lm.load` and generate on the main thread.
Prints one JSON line: rank, size, tokens, error.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PROMPT, emit, greedy_tokens, maybe_install, on_thread  # noqa: E402

maybe_install()

import mlx.core as mx  # noqa: E402


def main():
    path = sys.argv[1]
    max_tokens = int(sys.argv[sys.argv.index("--max-tokens") + 1]) if "--max-tokens" in sys.argv else 8
    if "--reference" in sys.argv:
        from mlx_lm import load

        model, tokenizer = load(path)
        emit(rank=0, size=1, tokens=greedy_tokens(model, tokenizer, max_tokens=max_tokens), error=None)
        return
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init(strict=True, backend="ring")
    if "--pipeline" in sys.argv:
        model, tokenizer = sharded_load(path, pipeline_group=group)
    else:
        model, tokenizer = sharded_load(path, tensor_group=group)
    tokens, error, alive = on_thread(greedy_tokens, model, tokenizer, PROMPT, max_tokens, name="generate")
    emit(rank=group.rank(), size=group.size(), tokens=tokens, error=error, thread_alive=alive)


if __name__ == "__main__":
    main()
