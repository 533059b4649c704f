"""Loads a tiny model, generates once on a thread, joins it and exits (argv[-1]: shim | plain)."""
import sys
import threading

if sys.argv[-1] == "shim":
    import mlx_threadsafe

    mlx_threadsafe.install()
from mlx_lm import generate, load

from mlx_threadsafe.testing import PROMPT, build_lm

model, tokenizer = load(str(build_lm("llama")))
thread = threading.Thread(target=lambda: generate(model, tokenizer, PROMPT, max_tokens=4))
thread.start()
thread.join()
