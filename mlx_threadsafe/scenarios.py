"""Cross-thread scenarios on real MLX and tiny offline models, each run in a fresh process.

Used by ``mlx-threadsafe doctor``, by the tests and by the compat-matrix harness:

    python -m mlx_threadsafe.scenarios NAME [--shim]

prints one JSON line: {"scenario": NAME, "ok": bool, "detail": str}. A scenario
returns a short detail on success and raises on failure; a crash of the process
(segfault, abort) is reported by the parent from the exit code.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .testing import on_new_thread

class NotApplicable(Exception):
    """The release under test lacks what the scenario exercises (e.g. no BatchGenerator yet)."""


def require(module: str, attribute: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        raise NotApplicable(f"no {module}.{attribute} in this release") from None


SCENARIOS: Dict[str, Callable[[], str]] = {}
DESCRIPTIONS: Dict[str, str] = {}


def scenario(description: str):
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        SCENARIOS[fn.__name__] = fn
        DESCRIPTIONS[fn.__name__] = description
        return fn

    return register


@contextlib.contextmanager
def _non_metal_wired_limit(model, streams=None):
    yield


def _let_old_releases_generate_on_linux(module_names) -> None:
    """Give releases whose wired_limit is Metal-only the non-Metal branch later ones have.

    mlx-lm up to 0.25.2 and mlx-vlm 0.1.22 - 0.3.x read Metal's working-set size
    unconditionally, so on Linux every generate() dies with KeyError before any thread
    matters. Replaced in both runs of a scenario (with and without the shim), so the
    comparison stays fair.
    """
    import mlx.core as mx

    if mx.metal.is_available():
        return
    # Only modules the package imported itself: importing mlx_lm.generate by hand on
    # mlx-lm <= 0.22.2 would shadow the generate() function with the CLI module.
    for module_name in module_names:
        module = sys.modules.get(module_name)
        wired_limit = vars(module).get("wired_limit") if module is not None else None
        if wired_limit is None or wired_limit is _non_metal_wired_limit:
            continue
        # The generator body under contextmanager (and under the shim's close guard, if any).
        code = getattr(inspect.unwrap(wired_limit), "__code__", None)
        if code is not None and "is_available" not in code.co_names:
            module.wired_limit = _non_metal_wired_limit


def _load(arch: str, **kwargs):
    from mlx_lm import load

    from .testing import LM_ARCHS, build_lm

    _let_old_releases_generate_on_linux(("mlx_lm.generate", "mlx_lm.utils"))

    model_type = LM_ARCHS[arch]["model_type"]
    require(f"mlx_lm.models.{model_type}", "Model")  # older releases lack newer architectures
    return load(str(build_lm(arch)), **kwargs)


def _generate(model, tokenizer, max_tokens: int = 6) -> str:
    from mlx_lm import generate

    from .testing import PROMPT

    return generate(model, tokenizer, PROMPT, max_tokens=max_tokens)


# ------------------------------------------------------------------ scenarios


@scenario("load on main, generate on a worker thread (llama)")
def generate_on_worker() -> str:
    model, tokenizer = _load("llama")
    expected = _generate(model, tokenizer)
    got = on_new_thread(_generate, model, tokenizer)
    if got != expected:
        raise AssertionError(f"worker gave {got!r}, main gave {expected!r}")
    return repr(got)


@scenario("load on main, generate first on a worker (llama3 rope_scaling: lazy rope._freqs)")
def lazy_rope_on_worker() -> str:
    model, tokenizer = _load("llama3rope")
    return repr(on_new_thread(_generate, model, tokenizer))


@scenario("load(adapter_path=...) on main, generate on a worker (LoRA weights)")
def adapter_on_worker() -> str:
    from .testing import build_lora_adapter

    model, tokenizer = _load("llama", adapter_path=str(build_lora_adapter("llama")))
    return repr(on_new_thread(_generate, model, tokenizer))


@scenario("8 threads generate greedily at once and match the serial outputs (gemma3 sliding window)")
def eight_threads_match_serial() -> str:
    from concurrent.futures import ThreadPoolExecutor

    models = [_load("gemma3_text") for _ in range(2)]
    serial = [_generate(*models[i % 2]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: _generate(*models[i % 2]), range(8)))
    if threaded != serial:
        raise AssertionError(f"threaded {threaded} != serial {serial}")
    return f"{len(set(serial))} distinct outputs, all equal to serial"


@scenario("asyncio.to_thread(generate)")
def asyncio_to_thread() -> str:
    import asyncio

    model, tokenizer = _load("qwen3")
    return repr(asyncio.run(asyncio.to_thread(_generate, model, tokenizer)))


@scenario("two worker threads sample at temperature 1.0 and draw different text")
def threads_sample_differently() -> str:
    from mlx_lm import generate

    from .testing import PROMPT

    make_sampler = require("mlx_lm.sample_utils", "make_sampler")
    model, tokenizer = _load("llama")
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


BATCH_PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11], [1, 12, 13]]


@dataclass
class BatchCase:
    """How to make a BatchGenerator of one package and queue BATCH_PROMPTS on it."""

    cls: type
    make: Callable[..., object]  # keyword arguments go to the constructor
    insert: Callable[[object], list]
    next_kwargs: Callable[[], dict] = dict  # what each next() takes (mlx-vlm before 0.5.0)


def _lm_batch_case() -> BatchCase:
    BatchGenerator = require("mlx_lm.generate", "BatchGenerator")
    model, _ = _load("llama")
    return BatchCase(BatchGenerator, lambda **kwargs: BatchGenerator(model, max_tokens=8, **kwargs),
                     lambda generator: generator.insert(BATCH_PROMPTS))


def _vlm_batch_case() -> BatchCase:
    import inspect

    import mlx.core as mx
    from mlx_vlm import load

    BatchGenerator = require("mlx_vlm.generate", "BatchGenerator")
    model, processor = load(_build_vlm("gemma3"))

    def make(**kwargs):
        return BatchGenerator(model.language_model, processor, max_tokens=8, **kwargs)

    def embeddings(prompts) -> dict:
        # Built lazily on the calling thread, as the server's request threads do.
        return {k: v for k, v in model.get_input_embeddings(mx.array(prompts), None).to_dict().items()
                if v is not None}

    if "prompt_kwargs" in inspect.signature(BatchGenerator.insert).parameters:
        return BatchCase(BatchGenerator, make, lambda generator: generator.insert(
            BATCH_PROMPTS, prompt_kwargs=[embeddings([prompt]) for prompt in BATCH_PROMPTS]))
    # Before 0.5.0 next() takes the embeddings of the whole padded batch, sliced by the
    # generator in its own (length) order: prompts of one length need no padding.
    prompts = [prompt[:3] for prompt in BATCH_PROMPTS]
    inserted: Dict[str, dict] = {}

    def insert(generator) -> list:
        # Evaluated here: every next() of every thread passes these same arrays.
        inserted["kwargs"] = embeddings(prompts)
        mx.eval(list(inserted["kwargs"].values()))
        return generator.insert(prompts)

    return BatchCase(BatchGenerator, make, insert, next_kwargs=lambda: inserted.get("kwargs", {}))


def _step(generator, tokens, lock=None, **next_kwargs) -> bool:
    """One next(); records each generated token under its uid; False once nothing is left."""
    result = generator.next(**next_kwargs)
    responses = result[1] if isinstance(result, tuple) else result
    if lock is not None:
        lock.acquire()
    try:
        for response in responses:
            tokens.setdefault(response.uid, []).append(response.token)
    finally:
        if lock is not None:
            lock.release()
    if hasattr(type(generator), "has_work"):  # mlx-vlm: a prompt step may return nothing yet
        return generator.has_work
    return bool(responses) or (isinstance(result, tuple) and bool(result[0]))


def _one_thread_tokens(case: BatchCase, remove_first: bool = False):
    generator = case.make()
    uids = case.insert(generator)
    tokens: Dict[int, list] = {}
    for _ in range(3):
        _step(generator, tokens, **case.next_kwargs())
    if remove_first:
        generator.remove([uids[0]])
        tokens.pop(uids[0], None)
    while _step(generator, tokens, **case.next_kwargs()):
        pass
    return tokens


def _handoff(case: BatchCase) -> str:
    # remove() joined BatchGenerator later than next() (mlx-lm 0.28.4, mlx-vlm 0.5.0).
    can_remove = hasattr(case.cls, "remove")
    expected = _one_thread_tokens(case, remove_first=can_remove)
    box: Dict[str, object] = {}

    def start_on_a():
        box["generator"] = generator = case.make()
        box["uids"] = case.insert(generator)
        box["tokens"] = tokens = {}
        for _ in range(3):
            _step(generator, tokens, **case.next_kwargs())

    def finish_on_b():
        generator, tokens = box["generator"], box["tokens"]
        if can_remove:
            generator.remove([box["uids"][0]])
            tokens.pop(box["uids"][0], None)
        while _step(generator, tokens, **case.next_kwargs()):
            pass
        return tokens

    on_new_thread(start_on_a)
    got = on_new_thread(finish_on_b)
    if got != expected:
        raise AssertionError(f"hand-off gave {got}, one thread gave {expected}")
    return f"{sum(map(len, got.values()))} tokens equal to the one-thread run"


def _shared_by(case: BatchCase, n_threads: int) -> str:
    expected = _one_thread_tokens(case)
    generator = case.make()
    case.insert(generator)
    tokens: Dict[int, list] = {}
    lock = threading.Lock()

    def drive():
        while _step(generator, tokens, lock, **case.next_kwargs()):
            pass

    threads = [threading.Thread(target=drive) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = {uid: sorted(t) for uid, t in tokens.items()}
    if got != {uid: sorted(t) for uid, t in expected.items()}:
        raise AssertionError(f"{n_threads} threads gave {tokens}, one thread gave {expected}")
    return f"{sum(map(len, got.values()))} tokens equal to the one-thread run"


@scenario("BatchGenerator stepped on thread A, then remove() and next() on thread B")
def batch_generator_handoff() -> str:
    return _handoff(_lm_batch_case())


@scenario("2 threads drive one BatchGenerator")
def batch_generator_shared_by_2_threads() -> str:
    return _shared_by(_lm_batch_case(), 2)


@scenario("8 threads drive one BatchGenerator")
def batch_generator_shared_by_8_threads() -> str:
    return _shared_by(_lm_batch_case(), 8)


class _MetalLikeClose:
    """Makes the CPU build take Metal's paths through a generator's wired limit and close().

    On CPU and CUDA, close() syncs nothing; on Metal it synchronizes the generator's
    stream, which raises from any thread but the stream's own. Records the wired limits
    set, so a test can see the limit restored. Everything is put back on exit, since
    later scenarios run in the same process.
    """

    def __enter__(self) -> "_MetalLikeClose":
        import mlx.core as mx

        self.limits: List[int] = []
        self.unraisable: List[str] = []
        self._saved = [(mx, "synchronize", mx.synchronize), (mx, "set_wired_limit", mx.set_wired_limit),
                       (mx, "device_info", getattr(mx, "device_info", None)),
                       (mx.metal, "is_available", mx.metal.is_available),
                       (mx.metal, "device_info", getattr(mx.metal, "device_info", None)),
                       (sys, "unraisablehook", sys.unraisablehook)]
        real_synchronize, real_set_wired_limit = mx.synchronize, mx.set_wired_limit

        def synchronize(stream=None):
            if stream is not None and isinstance(stream, mx.Stream) and stream != mx.default_stream(stream.device):
                raise RuntimeError(f"There is no {stream} in current thread.".replace("cpu", "gpu"))
            return real_synchronize() if stream is None else real_synchronize(stream)

        def set_wired_limit(limit):
            self.limits.append(limit)
            return real_set_wired_limit(limit)

        metal_info = {"max_recommended_working_set_size": 1 << 34, "memory_size": 1 << 35}
        mx.synchronize, mx.set_wired_limit = synchronize, set_wired_limit
        mx.metal.is_available = lambda: True
        mx.device_info = mx.metal.device_info = lambda *args: dict(metal_info)
        sys.unraisablehook = lambda info: self.unraisable.append(f"{info.exc_type.__name__}: {info.exc_value}")
        return self

    def __exit__(self, *exc_info) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


def _collected_on_foreign_thread(case: BatchCase, set_limit_by_hand: bool) -> str:
    import gc

    import mlx.core as mx

    with _MetalLikeClose() as metal:
        box: Dict[str, object] = {}

        def build_on_a():
            generator = case.make(stream=mx.default_stream(mx.default_device()))
            case.insert(generator)
            _step(generator, {}, **case.next_kwargs())
            if set_limit_by_hand:  # what mlx-lm's __init__ does on Metal
                generator._old_wired_limit = mx.set_wired_limit(0)
            box["generator"] = generator

        on_new_thread(build_on_a)
        del box["generator"]
        gc.collect()
    if metal.unraisable:
        raise AssertionError("; ".join(metal.unraisable))
    if len(metal.limits) < 2:
        raise AssertionError(f"the wired limit the generator set ({metal.limits}) was never restored")
    return f"collected silently, wired limit restored ({metal.limits})"


def _takes_stream(cls) -> None:
    import inspect

    if "stream" not in inspect.signature(cls).parameters:
        raise NotApplicable("this BatchGenerator takes no stream= (no close() sync to guard)")


@scenario("BatchGenerator collected on a foreign thread, close() forced down the Metal sync path")
def batch_generator_collected_on_foreign_thread() -> str:
    _takes_stream(require("mlx_lm.generate", "BatchGenerator"))
    return _collected_on_foreign_thread(_lm_batch_case(), set_limit_by_hand=True)


_MODULE_WITH_STREAM = """
import mlx.core as mx

STREAM = mx.new_stream(mx.default_device())  # at import, on the importing thread


def handle():
    with mx.stream(STREAM):
        y = mx.ones(4) * 2
    mx.eval(y)
    return y.tolist()
"""


@scenario("a stream a module makes at import, used on a request thread (any library's module)")
def module_stream_on_request_thread() -> str:
    import importlib
    import tempfile

    folder = tempfile.mkdtemp(prefix="mlx_threadsafe-module-")
    with open(os.path.join(folder, "module_with_stream.py"), "w") as file:
        file.write(_MODULE_WITH_STREAM)
    sys.path.insert(0, folder)
    module = importlib.import_module("module_with_stream")
    got = on_new_thread(module.handle)
    if got != module.handle():
        raise AssertionError(f"the request thread computed {got}, the importing thread {module.handle()}")
    return f"{got} on the request thread and on the importing thread"


@scenario("batch_generate's prompt caches continue the conversation in stream_generate (one thread)")
def batch_generate_caches_continue() -> str:
    from mlx_lm import stream_generate

    batch_generate = require("mlx_lm.generate", "batch_generate")
    if "return_prompt_caches" not in inspect.signature(batch_generate).parameters:
        raise NotApplicable("this batch_generate returns no prompt caches")
    model, tokenizer = _load("llama")
    result = batch_generate(model, tokenizer, BATCH_PROMPTS[:2], max_tokens=4, return_prompt_caches=True)
    follow_up = [r.token for r in stream_generate(model, tokenizer, [10, 11], prompt_cache=result.caches[0],
                                                  max_tokens=4)]
    return f"{len(follow_up)} follow-up tokens after {result.texts}"


@scenario("a scheduler thread drives its own BatchGenerator (thread-local stream=) and pickles the caches")
def batch_generator_on_its_scheduler_thread() -> str:
    import pickle

    import mlx.core as mx

    case = _lm_batch_case()
    _takes_stream(case.cls)
    if not hasattr(mx, "new_thread_local_stream"):
        raise NotApplicable("this mlx has no new_thread_local_stream")
    expected = _one_thread_tokens(case)

    def scheduler():
        generator = case.make(stream=mx.new_thread_local_stream(mx.default_device()))
        case.insert(generator)
        tokens: Dict[int, list] = {}
        saved = []
        while True:
            result = generator.next(**case.next_kwargs())
            responses = result[1] if isinstance(result, tuple) else result
            for response in responses:
                tokens.setdefault(response.uid, []).append(response.token)
                if response.finish_reason and getattr(response, "prompt_cache", None) is not None:
                    saved.append(pickle.dumps(response.prompt_cache))  # what a server keeps between requests
            if not (responses or (isinstance(result, tuple) and result[0])):
                return tokens, len(saved)

    got, saved = on_new_thread(scheduler)
    if got != expected:
        raise AssertionError(f"the scheduler thread gave {got}, the main thread {expected}")
    return f"{sum(map(len, got.values()))} tokens equal to the main-thread run; {saved} prompt caches pickled"


# ------------------------------------------------------------------ running


@dataclass(frozen=True)
class Outcome:
    scenario: str
    ok: bool
    detail: str
    applicable: bool = True


# ------------------------------------------------------------------ mlx-vlm scenarios


def _vlm_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


def _build_vlm(arch: str):
    from .testing import build_vlm

    require("mlx_vlm.utils", "update_module_configs")  # the offline builder needs it
    import mlx_vlm  # noqa: F401 - imports the modules whose wired_limit may need the stand-in

    _let_old_releases_generate_on_linux(("mlx_vlm.generate", "mlx_vlm.utils"))
    return str(build_vlm(arch))


@scenario("mlx-vlm: load a tiny gemma3 VLM (with processor) on main, generate with an image on a worker")
def vlm_generate_on_worker() -> str:
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(_build_vlm("gemma3"))
    prompt = apply_chat_template(processor, model.config, "w1 w2", num_images=1)
    image = _vlm_image()

    def run() -> str:
        result = generate(model, processor, prompt, image=[image], max_tokens=4, verbose=False)
        if isinstance(result, tuple):  # 0.1.26 - 0.1.27: (text, timing statistics)
            return result[0]
        return getattr(result, "text", result)

    expected = run()
    got = on_new_thread(run)
    if got != expected:
        raise AssertionError(f"worker gave {got!r}, main gave {expected!r}")
    return repr(got)


@scenario("mlx-vlm: load_model a tiny qwen2_vl on main, forward with an image on a worker")
def vlm_qwen2_vl_forward_on_worker() -> str:
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from mlx_vlm.utils import load_model

    model = load_model(Path(_build_vlm("qwen2_vl")))
    pixels = np.random.default_rng(0).standard_normal((16, 3 * 2 * 14 * 14)).astype(np.float32)

    def forward():
        ids = mx.array([[5, 288, 290, 290, 290, 290, 289, 7, 8]])
        out = model(ids, pixel_values=mx.array(pixels), image_grid_thw=mx.array([[1, 4, 4]]))
        logits = getattr(out, "logits", out)[0, -1].astype(mx.float32)
        # Evaluate explicitly, as mlx-vlm's own generate does: a thread that only evaluates
        # implicitly (np.array, .item()) is not adopted for its end-of-thread cleanup (a
        # known gap), and the process then aborts at exit in some runs.
        mx.eval(logits)
        return np.array(logits)

    got = on_new_thread(forward)  # first: a forward on main would evaluate lazy state there
    expected = forward()
    if not np.allclose(got, expected, atol=1e-4):
        raise AssertionError("worker logits differ from main-thread logits")
    return "same logits"


def _qwen2_vl_requests():
    """A tiny qwen2_vl and requests whose images differ in shape (so their MRoPE deltas differ)."""
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from mlx_vlm.utils import load_model

    model = load_model(Path(_build_vlm("qwen2_vl")))
    requests = []
    for index, (height, width, words) in enumerate([(4, 4, 2), (8, 4, 3), (4, 8, 1), (8, 8, 2)]):
        image_tokens = height * width // 4  # spatial_merge_size 2
        ids = [5, 288] + [290] * image_tokens + [289] + list(range(7, 7 + words))
        pixels = np.random.default_rng(index).standard_normal((height * width, 3 * 2 * 14 * 14)).astype(np.float32)
        requests.append((mx.array([ids]), mx.array(pixels), mx.array([[1, height, width]])))
    return model, requests


def _vlm_generate_step():
    for name in ("mlx_vlm.generate.ar", "mlx_vlm.generate", "mlx_vlm.utils"):
        module = sys.modules.get(name)
        if module is not None and callable(vars(module).get("generate_step")):
            return vars(module)["generate_step"]
    raise NotApplicable("no generate_step in this release")


def _greedy_steps(model, request, n_tokens: int = 6):
    """The generation of one request, as a generator of token ids."""
    import mlx.core as mx

    ids, pixels, grid = request
    steps = _vlm_generate_step()(ids, model, pixels, mx.ones(ids.shape, dtype=mx.int32), image_grid_thw=grid)
    for _, (token, _) in zip(range(n_tokens), steps):
        yield int(token.item() if hasattr(token, "item") else token)


@scenario("mlx-vlm: qwen2_vl prefill on thread A, decode on thread B (model-held _rope_deltas)")
def vlm_qwen2_vl_prefill_then_decode_elsewhere() -> str:
    model, requests = _qwen2_vl_requests()
    expected = list(_greedy_steps(model, requests[1]))
    steps = _greedy_steps(model, requests[1])
    first = on_new_thread(next, steps)
    got = [first] + on_new_thread(list, steps)
    if got != expected:
        raise AssertionError(f"hopping threads gave {got}, one thread gave {expected}")
    return f"{len(got)} tokens equal to the one-thread run"


def _raw_greedy_forwards(model, request, n_decode: int = 4):
    """Prefill with the image, then decode token by token, by calling the model itself."""
    import mlx.core as mx

    make_prompt_cache = require("mlx_vlm.models.cache", "make_prompt_cache")
    ids, pixels, grid = request
    cache = make_prompt_cache(model.language_model)

    def next_token(out):
        token = mx.argmax(getattr(out, "logits", out)[:, -1, :], axis=-1)
        mx.eval(token)
        return token

    def prefill():
        return next_token(model(ids, pixels, mask=None, cache=cache, image_grid_thw=grid))

    def decode(token):
        tokens = []
        for _ in range(n_decode):
            token = next_token(model(token[None], None, mask=None, cache=cache))
            tokens.append(token.item())
        return tokens

    return prefill, decode


@scenario("mlx-vlm: qwen2_vl raw forwards, prefill on thread A and decode on thread B (no generate_step)")
def vlm_qwen2_vl_raw_forwards_prefill_then_decode_elsewhere() -> str:
    model, requests = _qwen2_vl_requests()
    prefill, decode = _raw_greedy_forwards(model, requests[1])
    expected = decode(prefill())
    prefill, decode = _raw_greedy_forwards(model, requests[1])
    got = on_new_thread(decode, on_new_thread(prefill))
    if got != expected:
        raise AssertionError(f"hopping threads gave {got}, one thread gave {expected}")
    return f"{len(got)} decoded tokens equal to the one-thread run"


@scenario("mlx-vlm: two qwen2_vl generations interleaved step by step on one model (mlx-vlm #1415)")
def vlm_qwen2_vl_interleaved_requests_keep_their_positions() -> str:
    model, requests = _qwen2_vl_requests()
    first, second = requests[0], requests[3]  # 4 and 16 image tokens: different deltas
    expected = [list(_greedy_steps(model, first)), list(_greedy_steps(model, second))]
    a, b = _greedy_steps(model, first), _greedy_steps(model, second)
    got = [[next(a)], [next(b)]]  # both prefills done: the second wrote its positions last
    got[0] += list(a)
    got[1] += list(b)
    if got != expected:
        raise AssertionError(f"interleaved {got} != one after another {expected}")
    return "each generation kept its own positions"


@scenario("mlx-vlm: 4 threads generate on one qwen2_vl at once and match the serial outputs")
def vlm_qwen2_vl_concurrent_requests_match_serial() -> str:
    from concurrent.futures import ThreadPoolExecutor

    model, requests = _qwen2_vl_requests()
    serial = [list(_greedy_steps(model, request)) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        threaded = list(pool.map(lambda request: list(_greedy_steps(model, request)), requests))
    if threaded != serial:
        raise AssertionError(f"threaded {threaded} != serial {serial}")
    return f"{len(set(map(tuple, serial)))} distinct outputs, all equal to serial"


@scenario("mlx-vlm: BatchGenerator stepped on thread A, then remove() and next() on thread B")
def vlm_batch_generator_handoff() -> str:
    return _handoff(_vlm_batch_case())


@scenario("mlx-vlm: 2 threads drive one BatchGenerator")
def vlm_batch_generator_shared_by_2_threads() -> str:
    return _shared_by(_vlm_batch_case(), 2)


@scenario("mlx-vlm: BatchGenerator collected on a foreign thread, close() forced down the Metal sync path")
def vlm_batch_generator_collected_on_foreign_thread() -> str:
    _takes_stream(require("mlx_vlm.generate", "BatchGenerator"))
    return _collected_on_foreign_thread(_vlm_batch_case(), set_limit_by_hand=False)


def _outcome(line: Dict[str, object]) -> Outcome:
    return Outcome(str(line["scenario"]), bool(line["ok"]), str(line["detail"]), bool(line.get("applicable", True)))


def run_in_subprocess(name: str, shim: bool, python: Optional[str] = None, timeout: float = 300,
                      env: Optional[Dict[str, str]] = None) -> Outcome:
    return run_batch([name], shim, python, timeout, env)[name]


def _run_until_silent(command: List[str], env: Dict[str, str], timeout: float):
    """Run `command`, killing it once it has printed no line for `timeout` seconds.

    Returns (stdout, returncode or None if killed, stderr). A deadlocked scenario (or a
    process that hangs at exit) costs one `timeout`, however many scenarios came first.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()
    stderr: List[str] = []

    def pump_stdout() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    readers = [threading.Thread(target=pump_stdout, daemon=True),
               threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    stdout: List[str] = []
    returncode: Optional[int] = None
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            process.wait()
            break
        if line is None:
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # closed its output, then hung
                process.kill()
                process.wait()
            break
        stdout.append(line)
    for reader in readers:
        reader.join(timeout=5)
    return "".join(stdout), returncode, "".join(stderr)


def run_batch(names: List[str], shim: bool, python: Optional[str] = None, timeout: float = 300,
              env: Optional[Dict[str, str]] = None) -> Dict[str, Outcome]:
    """Run scenarios one after another in one fresh process (imports are paid once).

    A scenario that kills its process (segfault, abort) is reported from the exit code,
    one that runs `timeout` seconds without finishing as hung; the ones after it are run
    again, each in a process of its own.
    """
    command = [python or sys.executable, "-m", "mlx_threadsafe.scenarios", *names] + (["--shim"] if shim else [])
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    stdout, returncode, stderr = _run_until_silent(command, child_env, timeout)
    outcomes: Dict[str, Outcome] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            outcome = _outcome(json.loads(line))
            outcomes[outcome.scenario] = outcome
    if len(outcomes) == len(names):
        last = outcomes[names[-1]]
        if returncode != 0 and last.ok:  # every scenario reported, then the process died at exit
            ending = f"exited with {returncode}" if returncode is not None else f"hung for {timeout}s at exit"
            outcomes[last.scenario] = Outcome(last.scenario, False, f"passed, then the process {ending}",
                                              last.applicable)
        return outcomes
    if returncode is None:
        died = f"hung for {timeout}s"
    else:
        died = f"process died (exit {returncode}): {(stderr.strip().splitlines() or ['no output'])[-1]}"
    remaining = [name for name in names if name not in outcomes]
    outcomes[remaining[0]] = Outcome(remaining[0], False, died)
    for name in remaining[1:]:
        outcomes.update(run_batch([name], shim, python, timeout, env))
    return outcomes


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shim = "--shim" in argv
    names = [a for a in argv if not a.startswith("--")]
    unknown = [name for name in names if name not in SCENARIOS]
    if not names or unknown:
        print(f"usage: python -m mlx_threadsafe.scenarios NAME... [--shim]; names: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    if shim:
        import mlx_threadsafe

        mlx_threadsafe.install()
    for name in names:
        applicable = True
        try:
            detail, ok = SCENARIOS[name](), True
        except NotApplicable as reason:
            detail, ok, applicable = str(reason), True, False
        except Exception as error:  # noqa: BLE001 - the outcome is the report
            detail, ok = f"{type(error).__name__}: {error}", False
        print(json.dumps({"scenario": name, "ok": ok, "detail": str(detail)[:300], "applicable": applicable}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
