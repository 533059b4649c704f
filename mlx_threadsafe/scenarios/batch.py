"""BatchGenerator scenarios (mlx-lm and mlx-vlm): hand-offs, sharing, foreign collection, and its own thread."""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict

from ..testing import on_new_thread
from .catalogue import NotApplicable, require, scenario
from .fakes import _MetalLikeClose
from .lm import _load
from .vlm import _build_vlm

BATCH_PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11], [1, 12, 13]]


@dataclass
class BatchCase:
    """How to make a BatchGenerator of one package and queue BATCH_PROMPTS on it."""

    cls: Any
    make: Callable[..., Any]  # keyword arguments go to the constructor
    insert: Callable[[Any], list]
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


