"""BatchGenerator scenarios (mlx-lm and mlx-vlm): hand-offs, sharing, foreign collection, and its own thread."""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ..testing import on_new_thread
from .catalogue import NotApplicable, require, scenario
from .fakes import MetalLikeClose
from .lm import load_lm
from .vlm import build_vlm_path

BATCH_PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11], [1, 12, 13]]


@dataclass
class BatchCase:
    """How to make a BatchGenerator of one package and queue BATCH_PROMPTS on it."""

    cls: Any
    make: Callable[..., Any]  # keyword arguments go to the constructor
    insert: Callable[[Any], list]
    next_kwargs: Callable[[], dict] = dict  # what each next() takes (mlx-vlm before 0.5.0)
    wired_limit_by_hand: bool = False  # set the limit mlx-lm's __init__ sets on Metal (the CPU build skips it)


def _batch_generator(module: str, takes_stream: bool):
    """The release's BatchGenerator; NotApplicable (before any model loads) if it must take stream= and does not."""
    cls = require(module, "BatchGenerator")
    if takes_stream and "stream" not in inspect.signature(cls).parameters:
        raise NotApplicable("this BatchGenerator takes no stream= (no close() sync to guard)")
    return cls


def _lm_batch_case(takes_stream: bool = False) -> BatchCase:
    BatchGenerator = _batch_generator("mlx_lm.generate", takes_stream)
    model, _ = load_lm("llama")
    return BatchCase(BatchGenerator, lambda **kwargs: BatchGenerator(model, max_tokens=8, **kwargs),
                     lambda generator: generator.insert(BATCH_PROMPTS), wired_limit_by_hand=True)


def _vlm_batch_case(takes_stream: bool = False) -> BatchCase:
    BatchGenerator = _batch_generator("mlx_vlm.generate", takes_stream)
    import mlx.core as mx
    from mlx_vlm import load

    model, processor = load(build_vlm_path("gemma3"))

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


def _same_tokens(got, expected, who: str, reference: str = "one thread") -> str:
    """Raise unless `who` generated what `reference` did; else the detail that says so."""
    if got != expected:
        raise AssertionError(f"{who} gave {got}, {reference} gave {expected}")
    return f"{sum(map(len, got.values()))} tokens equal to the {reference.replace(' ', '-')} run"


def _handoff(make_case: Callable[..., BatchCase]) -> str:
    case = make_case()
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
    return _same_tokens(on_new_thread(finish_on_b), expected, "hand-off")


def _shared_by(make_case: Callable[..., BatchCase], n_threads: int) -> str:
    case = make_case()
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
    return _same_tokens({uid: sorted(t) for uid, t in tokens.items()},
                        {uid: sorted(t) for uid, t in expected.items()}, f"{n_threads} threads")


def _collected_on_foreign_thread(make_case: Callable[..., BatchCase]) -> str:
    import gc

    import mlx.core as mx

    case = make_case(takes_stream=True)
    with MetalLikeClose() as metal:
        box: Dict[str, object] = {}

        def build_on_a():
            generator = case.make(stream=mx.default_stream(mx.default_device()))
            case.insert(generator)
            _step(generator, {}, **case.next_kwargs())
            if case.wired_limit_by_hand:
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


def _on_lm_and_vlm(name: str, description: str, check: Callable[[Callable[..., BatchCase]], str],
                   doctor: Optional[int] = None) -> None:
    """Register `check` as scenario `name` on mlx-lm's BatchGenerator and as ``vlm_<name>`` on mlx-vlm's."""
    scenario(description, name=name, doctor=doctor)(lambda: check(_lm_batch_case))
    scenario(f"mlx-vlm: {description}", name=f"vlm_{name}")(lambda: check(_vlm_batch_case))


_on_lm_and_vlm("batch_generator_handoff", "BatchGenerator stepped on thread A, then remove() and next() on thread B",
               _handoff, doctor=7)
_on_lm_and_vlm("batch_generator_shared_by_2_threads", "2 threads drive one BatchGenerator",
               lambda make_case: _shared_by(make_case, 2))
scenario("8 threads drive one BatchGenerator", name="batch_generator_shared_by_8_threads", doctor=8)(
    lambda: _shared_by(_lm_batch_case, 8))
_on_lm_and_vlm("batch_generator_collected_on_foreign_thread",
               "BatchGenerator collected on a foreign thread, close() forced down the Metal sync path",
               _collected_on_foreign_thread, doctor=11)


@scenario("batch_generate's prompt caches continue the conversation in stream_generate (one thread)")
def batch_generate_caches_continue() -> str:
    from mlx_lm import stream_generate

    batch_generate = require("mlx_lm.generate", "batch_generate")
    if "return_prompt_caches" not in inspect.signature(batch_generate).parameters:
        raise NotApplicable("this batch_generate returns no prompt caches")
    model, tokenizer = load_lm("llama")
    result = batch_generate(model, tokenizer, BATCH_PROMPTS[:2], max_tokens=4, return_prompt_caches=True)
    follow_up = [r.token for r in stream_generate(model, tokenizer, [10, 11], prompt_cache=result.caches[0],
                                                  max_tokens=4)]
    return f"{len(follow_up)} follow-up tokens after {result.texts}"


@scenario("a scheduler thread drives its own BatchGenerator (thread-local stream=) and pickles the caches")
def batch_generator_on_its_scheduler_thread() -> str:
    import pickle

    import mlx.core as mx

    case = _lm_batch_case(takes_stream=True)
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
    return f"{_same_tokens(got, expected, 'the scheduler thread', 'main thread')}; {saved} prompt caches pickled"

