"""Scenario (b): generate on a worker thread, join it, then let the process exit.

    rank_thread_exit.py MODEL_DIR [--install] [--max-tokens N]

`sharded_load` (tensor parallel) on the main thread, `stream_generate` at temperature 0 on
a worker thread that ends; the rank prints its outcome and returns from main normally, so
any abort (`terminate called without an active exception`, -6) happens at interpreter exit.
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
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init(strict=True, backend="ring")
    model, tokenizer = sharded_load(path, tensor_group=group)
    tokens, error, alive = on_thread(greedy_tokens, model, tokenizer, PROMPT, max_tokens, name="generate")
    emit(rank=group.rank(), size=group.size(), tokens=tokens, error=error, thread_alive=alive)


if __name__ == "__main__":
    main()
