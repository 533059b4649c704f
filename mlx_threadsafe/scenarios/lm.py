"""mlx-lm scenarios: load on one thread, generate on another; random keys; module streams."""

from __future__ import annotations

import os
import sys

from ..testing import on_new_thread
from .catalogue import require, scenario
from .fakes import let_old_releases_generate_on_linux


def load_lm(arch: str, **kwargs):
    """`mlx_lm.load` of a tiny offline model of `arch` (see ``testing.LM_ARCHS``); batch scenarios use it too."""
    from mlx_lm import load

    from ..testing import LM_ARCHS, build_lm

    let_old_releases_generate_on_linux(("mlx_lm.generate", "mlx_lm.utils"))

    model_type = LM_ARCHS[arch]["model_type"]
    require(f"mlx_lm.models.{model_type}", "Model")  # older releases lack newer architectures
    return load(str(build_lm(arch)), **kwargs)


def _generate(model, tokenizer, max_tokens: int = 6) -> str:
    from mlx_lm import generate

    from ..testing import PROMPT

    return generate(model, tokenizer, PROMPT, max_tokens=max_tokens)


# ------------------------------------------------------------------ scenarios


@scenario("load on main, generate on a worker thread (llama)", doctor=1)
def generate_on_worker() -> str:
    model, tokenizer = load_lm("llama")
    expected = _generate(model, tokenizer)
    got = on_new_thread(_generate, model, tokenizer)
    if got != expected:
        raise AssertionError(f"worker gave {got!r}, main gave {expected!r}")
    return repr(got)


@scenario("load on main, generate first on a worker (llama3 rope_scaling: lazy rope._freqs)", doctor=2)
def lazy_rope_on_worker() -> str:
    model, tokenizer = load_lm("llama3rope")
    return repr(on_new_thread(_generate, model, tokenizer))


@scenario("load(adapter_path=...) on main, generate on a worker (LoRA weights)", doctor=3)
def adapter_on_worker() -> str:
    from ..testing import build_lora_adapter

    model, tokenizer = load_lm("llama", adapter_path=str(build_lora_adapter("llama")))
    return repr(on_new_thread(_generate, model, tokenizer))


@scenario("8 threads generate greedily at once and match the serial outputs (gemma3 sliding window)", doctor=5)
def eight_threads_match_serial() -> str:
    from concurrent.futures import ThreadPoolExecutor

    models = [load_lm("gemma3_text") for _ in range(2)]
    serial = [_generate(*models[i % 2]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: _generate(*models[i % 2]), range(8)))
    if threaded != serial:
        raise AssertionError(f"threaded {threaded} != serial {serial}")
    return f"{len(set(serial))} distinct outputs, all equal to serial"


@scenario("8 threads generate greedily at once on 2 llama models (4 threads a tokenizer) and match serial")
def eight_threads_share_a_tokenizer() -> str:
    """The detokenizer race alone: every release has llama (mlx-lm before 0.20.1 has no gemma3)."""
    from concurrent.futures import ThreadPoolExecutor

    models = [load_lm("llama")[:2] for _ in range(2)]

    def generate(i: int) -> str:
        model, tokenizer = models[i % 2]
        return _generate(model, tokenizer, max_tokens=12)

    serial = [generate(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(generate, range(8)))
    if threaded != serial:
        raise AssertionError(f"threaded {threaded} != serial {serial}")
    return f"{len(set(serial))} distinct outputs, all equal to serial"


@scenario("asyncio.to_thread(generate)", doctor=4)
def asyncio_to_thread() -> str:
    import asyncio

    model, tokenizer = load_lm("qwen3")
    return repr(asyncio.run(asyncio.to_thread(_generate, model, tokenizer)))


@scenario("two worker threads sample at temperature 1.0 and draw different text", doctor=6)
def threads_sample_differently() -> str:
    from mlx_lm import generate

    from ..testing import PROMPT

    make_sampler = require("mlx_lm.sample_utils", "make_sampler")
    model, tokenizer = load_lm("llama")
    sampler = make_sampler(temp=1.0)
    outputs = [on_new_thread(generate, model, tokenizer, PROMPT, max_tokens=12, sampler=sampler) for _ in range(2)]
    if outputs[0] == outputs[1]:
        raise AssertionError(f"both threads drew the same text: {outputs[0]!r}")
    return "different"


@scenario("a sampler mlx-lm compiled at import draws fresh numbers on a worker thread (mlx-lm #1675)")
def compiled_sampler_advances_on_worker() -> str:
    import mlx.core as mx

    make_sampler = require("mlx_lm.sample_utils", "make_sampler")
    sampler = make_sampler(temp=1.0)
    flat = mx.zeros((1, 1000))
    mx.eval(flat)
    draws = on_new_thread(lambda: [sampler(flat).item() for _ in range(8)])
    if len(set(draws)) == 1:
        raise AssertionError(f"the sampler drew {draws[0]} on all 8 calls on a worker thread")
    return f"{len(set(draws))} distinct draws in 8"



_MODULE_WITH_STREAM = """
import mlx.core as mx

STREAM = mx.new_stream(mx.default_device())  # at import, on the importing thread


def handle():
    with mx.stream(STREAM):
        y = mx.ones(4) * 2
    mx.eval(y)
    return y.tolist()
"""


def _import_written(name: str, source: str):
    """Import `source` as module `name` from a fresh folder: a library's module, imported on this thread."""
    import importlib
    import tempfile

    folder = tempfile.mkdtemp(prefix="mlx_threadsafe-module-")
    with open(os.path.join(folder, f"{name}.py"), "w") as file:
        file.write(source)
    sys.path.insert(0, folder)
    return importlib.import_module(name)


@scenario("a stream a module makes at import, used on a request thread (any library's module)", doctor=9)
def module_stream_on_request_thread() -> str:
    module = _import_written("module_with_stream", _MODULE_WITH_STREAM)
    got = on_new_thread(module.handle)
    if got != module.handle():
        raise AssertionError(f"the request thread computed {got}, the importing thread {module.handle()}")
    return f"{got} on the request thread and on the importing thread"




_MODULE_HOLDING_STREAMS = """
import queue

import mlx.core as mx


class Engine:
    STREAM = mx.new_stream(mx.default_device())  # a class attribute, at import


STREAMS = {"gen": mx.new_stream(mx.default_device())}  # a container, at import


class Loader:
    # A data loader that prefetches on a thread, with the stream it made in __init__.
    def __init__(self):
        self.stream = mx.new_stream(mx.default_device())
        self.batches = queue.Queue()

    def prefetch(self):
        with mx.stream(self.stream):
            batch = mx.arange(4) * 3
        mx.eval(batch)
        self.batches.put(batch.tolist())


def double_on(stream):
    with mx.stream(stream):
        y = mx.ones(4) * 2
    mx.eval(y)
    return y.tolist()


def plus_one_by_default(stream):
    mx.set_default_stream(stream)
    y = mx.ones(2) + 1
    mx.eval(y)
    return y.tolist()
"""


@scenario("streams held anywhere (class and instance attributes, containers, made in main()) entered on "
          "request threads", doctor=10)
def streams_held_anywhere_on_request_threads() -> str:
    import threading

    import mlx.core as mx

    module = _import_written("module_holding_streams", _MODULE_HOLDING_STREAMS)
    engine = type("Engine", (), {})()
    engine.stream = mx.new_stream(mx.default_device())  # an instance attribute, made after import
    made_in_main = mx.new_stream(mx.default_device())
    held = {"class attribute": module.Engine.STREAM, "container": module.STREAMS["gen"],
            "instance attribute": engine.stream, "made in main()": made_in_main}
    failed = {}
    for where, stream in held.items():
        try:
            got = on_new_thread(module.double_on, stream)
            if got != module.double_on(stream):
                failed[where] = f"computed {got}"
        except RuntimeError as error:
            failed[where] = str(error).splitlines()[0]
    try:
        on_new_thread(module.plus_one_by_default, made_in_main)
    except RuntimeError as error:
        failed["set_default_stream"] = str(error).splitlines()[0]
    loader = module.Loader()
    prefetching = threading.Thread(target=loader.prefetch, name="prefetch")
    prefetching.start()
    prefetching.join()
    if loader.batches.empty():
        failed["data loader's self.stream"] = "the prefetch thread produced nothing"
    if failed:
        raise AssertionError("; ".join(f"{where}: {why}" for where, why in failed.items()))
    return f"{len(held) + 2} places, each entered on another thread, computed what the making thread computes"
