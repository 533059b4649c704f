"""What the rank scripts share (imported from tests/distributed/ by path: keep it stdlib-light)."""
import json
import sys
import threading
import traceback

PROMPT = "w1 w2 w3 w4"


def maybe_install(argv=None) -> bool:
    """`--install` on the command line: install the shim first thing (before mlx_lm is imported)."""
    if "--install" in (argv if argv is not None else sys.argv):
        import mlx_threadsafe

        mlx_threadsafe.install()
    return shim_installed()


def shim_installed() -> bool:
    module = sys.modules.get("mlx_threadsafe")
    return bool(module is not None and module.is_installed())


def emit(**fields) -> None:
    """The rank's outcome: one JSON line on stdout, flushed (the wrapper files it per rank)."""
    fields.setdefault("shim", shim_installed())
    print(json.dumps(fields, default=str), flush=True)


def on_thread(fn, *args, name="worker", timeout=None):
    """Run fn on a new (non-daemon) thread; returns (result, error_string, thread_alive)."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - reported, not raised
            box["error"] = f"{type(error).__name__}: {error}"
            box["traceback"] = traceback.format_exc()

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join(timeout)
    return box.get("result"), box.get("error"), thread.is_alive()


def greedy_tokens(model, tokenizer, prompt=PROMPT, max_tokens=8):
    """Token ids of a temperature-0 generation (mlx_lm.stream_generate, argmax sampler)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    tokens = []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        tokens.append(int(response.token))
    return tokens
