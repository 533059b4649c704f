"""Continuous batching for unchanged threaded programs (opt-in).

With the mode on, every ``mlx_lm.stream_generate`` call (and so ``mlx_lm.generate``)
that a ``BatchGenerator`` can serve joins one batch per model instead of running its
own forward passes. The batch is a ``BatchGenerator`` owned by a `Worker` thread of
that model, stepped while any request is in it: a request joins at the next step,
leaves when it finishes (its ``max_tokens``, an EOS of its own tokenizer), when its
caller stops iterating (the generator closed or collected) or when its own sampler or
logits processor raises. Each caller's iterator still yields the same
``GenerationResponse`` fields, its text from its own detokenizer.

A call that finds no batch running starts alone, on its own thread, as without the mode
(so a lone caller pays nothing); when another call comes, it moves into the batch at its
next token, with its KV cache and its tokens so far.

Turn it on with ``mlx_threadsafe.install(batch=True)``, the environment variable
``MLX_THREADSAFE_BATCH=1`` (read when the first call is routed, so it works with
``MLX_THREADSAFE=1`` too) or the pytest plugin's ``--mlx-threadsafe-batch``. Off by
default: a batch computes in other shapes than one request alone, which may change the
last bits of the logits (on the CPU the greedy tokens measured equal; in bfloat16 on a
GPU some differ), and sampling draws from the Worker's random key, not the caller's.

Calls the batch cannot serve run as without the mode (the original ``stream_generate``
on the calling thread): a draft model, a prompt cache passed in, a non-default stream,
``max_tokens`` < 1, a KV cache option (``max_kv_size``, ``kv_bits``), a prefill size,
a progress callback, input embeddings, an unknown keyword, a prompt that is not one
sequence of tokens, a model whose caches do not merge into a batch. `stats()` counts
each path, the reasons of the direct ones, and the largest batch that formed.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional

from . import streams

log = logging.getLogger("mlx_threadsafe")

ENV = "MLX_THREADSAFE_BATCH"
_TRUE = ("1", "true", "yes", "on")

# stream_generate's keywords a batch serves: with these values, or any value (None).
_SERVED_AS = {
    "sampler": None, "logits_processors": None, "num_draft_tokens": None,
    "max_kv_size": (None,), "prompt_cache": (None,), "kv_bits": (None,),
    "kv_group_size": None, "quantized_kv_start": None,  # only read with kv_bits
    "prompt_progress_callback": (None,), "input_embeddings": (None,), "prefill_step_size": (2048,),
}

START_ALONE = True  # a call that finds no batch running starts alone (False: every call joins the batch)
# While calls come together (this many seconds after the batch last held two or more requests), a
# call on a thread new to MLX joins the batch instead of starting alone: its set-up (its stream; on
# CUDA its graphs, handles and the capture gate's exclusive first use) delayed a whole burst. After a
# quiet spell it starts alone, so a pool thread that only ever calls with the mode on does not pay
# a batch of one for every lone call (docs/batch-mode.md, "Measured").
NEW_THREADS_JOIN_WITHIN = 1.0
# A caller gets its first and last token at once, the others at most this often (seconds; 0: every
# step). Waking 8 threads at every step of a fast model costs more Python, under the GIL, than the
# step: handed over in bunches, they take it in one go (docs/batch-mode.md, "Measured").
HAND_OVER_INTERVAL = 0.01
_enabled: Optional[bool] = None  # None: MLX_THREADSAFE_BATCH decides, at the first routed call
_applied = False  # the patch is applied (a wrapper left in a module after uninstall passes through)
_moves_in = False  # BatchGenerator.insert takes a request's cache and tokens so far (mlx-lm 0.32+)
_lock = threading.Lock()
_batches: Dict[int, "_ModelBatch"] = {}
_names = itertools.count()
_counters: Counter = Counter()
_direct_reasons: Counter = Counter()


# ------------------------------------------------------------------ the switch


def set_enabled(on: bool) -> None:
    """Turn the mode on or off for the calls that start from now on."""
    global _enabled
    _enabled = bool(on)


def set_applied(applied: bool, moves_in: bool = False) -> None:
    """Whether the stream_generate patch is applied; its apply and its revert say so.

    A wrapper left in a module after uninstall() (a copy name-imported after install())
    passes every call through while this is False, whatever `set_enabled` said.
    `moves_in`: the release's ``BatchGenerator.insert`` takes ``caches=`` and ``all_tokens=``,
    so that a call that started alone can move into the batch (otherwise none starts alone).
    """
    global _applied, _moves_in
    _applied = bool(applied)
    _moves_in = bool(applied and moves_in)


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV, "").strip().lower() in _TRUE
    return _enabled and _applied


def stats() -> Dict[str, Any]:
    """How many calls joined a batch and how many ran directly (and why), and what the batches did."""
    with _lock:
        batches = list(_batches.values())
        result = {
            "enabled": enabled(),
            "batched_calls": _counters["batched"],
            "started_alone": _counters["alone"],
            "moved_into_batch": _counters["moved"],
            "direct_calls": _counters["direct"],
            "direct_reasons": dict(_direct_reasons),
            "left_early": _counters["left_early"],
            "failed": _counters["failed"],
            "steps": _counters["steps"],
            "tokens": _counters["tokens"],
            "max_batch_size": _counters["max_batch_size"],
        }
    result["sequences_in_batches"] = sum(batch.sequences for batch in batches)
    result["requests_in_batches"] = sum(batch.requests for batch in batches)
    return result


def reset_stats() -> None:
    with _lock:
        _counters.clear()
        _direct_reasons.clear()


def _count(key: str, amount: int = 1) -> None:
    with _lock:
        _counters[key] += amount


# ------------------------------------------------------------------ routing


def route(wrapped, instance, args, kwargs):
    """The patched ``stream_generate``: a batched iterator, or the original call."""
    if not enabled():
        return wrapped(*args, **kwargs)
    plan = _plan(args, kwargs)
    if isinstance(plan, str):
        with _lock:
            _counters["direct"] += 1
            _direct_reasons[plan] += 1
        return wrapped(*args, **kwargs)
    _count("batched")
    return _batched_stream(*plan)


def _plan(args, kwargs):
    """(batch, tokenizer, prompt, max_tokens, sampler, logits_processors), or why the call runs directly."""
    names = ("model", "tokenizer", "prompt", "max_tokens", "draft_model", "stream")
    if len(args) > len(names):
        return "positional arguments"
    call = dict(zip(names, args))
    for name in names:
        if name in kwargs:
            if name in call:
                return "arguments"  # the original raises its TypeError
            call[name] = kwargs[name]
    if not all(name in call for name in names[:3]):
        return "arguments"
    if call.get("draft_model") is not None:
        return "draft_model"
    if "stream" in call:
        return "stream"
    max_tokens = call.get("max_tokens", 256)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        return "max_tokens"
    for name, value in kwargs.items():
        if name in names:
            continue
        if name not in _SERVED_AS:
            return f"keyword {name}"
        served = _SERVED_AS[name]
        if served is not None and not any(value is v or (v is not None and value == v) for v in served):
            return name
    prompt = call["prompt"]
    if not isinstance(prompt, str) and not _is_token_list(prompt):
        return "prompt"
    batch = _batch_for(call["model"])
    if batch is None:
        return "model caches"
    return (batch, call["tokenizer"], prompt, max_tokens, kwargs.get("sampler"), kwargs.get("logits_processors"))


def _is_token_list(prompt) -> bool:
    if isinstance(prompt, (list, tuple)):
        return len(prompt) > 0 and all(isinstance(t, int) for t in prompt)
    ndim = getattr(prompt, "ndim", None)
    return ndim == 1 and prompt.size > 0 and "int" in str(getattr(prompt, "dtype", ""))


def _batch_for(model) -> "Optional[_ModelBatch]":
    key = id(model)
    batch = _batches.get(key)
    if batch is not None and batch.model_ref() is model:
        return batch if batch.supported else None
    with _lock:
        batch = _batches.get(key)
        if batch is None or batch.model_ref() is not model:
            batch = _batches[key] = _ModelBatch(model)
            weakref.finalize(model, _forget, key, batch)
    return batch if batch.supported else None


def _forget(key: int, batch: "_ModelBatch") -> None:
    with _lock:
        if _batches.get(key) is batch:
            del _batches[key]
    batch.close()


def _caches_merge(model) -> bool:
    """Whether the model's prompt caches can join a batch (each cache type has a merge)."""
    try:
        from mlx_lm.models.cache import make_prompt_cache

        return all(hasattr(type(cache), "merge") for cache in make_prompt_cache(model))
    except Exception:  # noqa: BLE001 - whatever cannot be checked runs directly
        log.debug("batching: the caches of %s could not be checked", type(model).__name__, exc_info=True)
        return False


# ------------------------------------------------------------------ one caller's side


class _Request:
    __slots__ = ("prompt", "max_tokens", "sampler", "logits_processors", "eos", "items", "uid", "error",
                 "finished", "cache", "history", "own_sampler", "own_processors", "pending", "handed_over_at",
                 "__weakref__")

    def __init__(self, prompt: List[int], max_tokens: int, sampler, logits_processors, eos) -> None:
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.eos = eos
        self.cache: Optional[List[Any]] = None  # set when it moves in from alone: its KV cache so far
        self.history: List[int] = []  # and the tokens before `prompt` (its logits processors see them)
        self.own_sampler, self.own_processors = sampler, logits_processors  # as given: run alone
        self.items: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # lists of (token, logprobs, last), or an error
        self.pending: List[Any] = []  # tokens the Worker has not handed over yet
        self.handed_over_at: Optional[float] = None  # when the Worker last did (None: not yet)
        self.uid: Optional[int] = None
        self.error: Optional[BaseException] = None  # raised by its own sampler or logits processor
        self.finished = False  # its last token was taken (the batch dropped it already)
        self.sampler = None if sampler is None else self._guarded_sampler(sampler)
        self.logits_processors = [self._guarded_processor(p) for p in logits_processors or ()]

    def take(self, token: int, logprobs, last: bool, now: float) -> None:
        """On the Worker: a token of this request; hand over what is pending when it is due."""
        self.pending.append((token, logprobs, last))
        if last or self.handed_over_at is None or now - self.handed_over_at >= HAND_OVER_INTERVAL:
            self.hand_over(now)

    def hand_over(self, now: float) -> None:
        if self.pending:
            self.items.put(self.pending)
            self.pending = []
            self.handed_over_at = now

    def fail(self, error: BaseException) -> None:
        """On the Worker: the tokens already computed, then the error."""
        self.hand_over(0.0)
        self.items.put(error)

    # A request's own code runs inside the batch's step: its error must end that request
    # alone, not the step of every other request. The row gets a harmless value and the
    # error goes to the caller, whose sequence then leaves the batch.
    def _guarded_sampler(self, sampler):
        def sample(logprobs):
            if self.error is None:
                try:
                    return sampler(logprobs)
                except Exception as error:  # noqa: BLE001 - handed to this request's caller
                    self.error = error
            import mlx.core as mx

            return mx.argmax(logprobs, axis=-1)

        return sample

    def _guarded_processor(self, processor):
        def process(tokens, logits):
            if self.error is None:
                try:
                    return processor(tokens, logits)
                except Exception as error:  # noqa: BLE001 - handed to this request's caller
                    self.error = error
            return logits

        return process


def _prompt_tokens(tokenizer, prompt) -> List[int]:
    # As stream_generate encodes it.
    if isinstance(prompt, str):
        add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    return [int(t) for t in prompt.tolist()]


def _evaluate_captured(functions) -> None:
    """Evaluate here the arrays a caller's sampler and processors captured (they run on the Worker).

    A mask built lazily on the calling thread (``mx.where(...)`` in a closure) belongs to
    that thread's stream; evaluated, the Worker can read it. Closure cells, defaults and
    a partial's arguments are searched, containers inside them too, not objects.
    """
    captured: List[Any] = []
    for function in functions:
        if function is None:
            continue
        captured.extend(getattr(function, "args", ()) or ())
        captured.extend((getattr(function, "keywords", None) or {}).values())
        captured.extend(getattr(function, "__defaults__", None) or ())
        for cell in getattr(function, "__closure__", None) or ():
            try:
                captured.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    if captured:
        from .materialize import materialize

        materialize(captured, into_objects=False)


_response_fields: Dict[type, frozenset] = {}


def _response(cls, **values):
    fields = _response_fields.get(cls)
    if fields is None:
        import dataclasses

        fields = _response_fields[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return cls(**{name: value for name, value in values.items() if name in fields})


def _batched_stream(batch, tokenizer, prompt, max_tokens, sampler, logits_processors):
    """What stream_generate yields, from a sequence of the model's batch."""
    import mlx.core as mx
    from mlx_lm.generate import GenerationResponse
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    tokens = _prompt_tokens(tokenizer, prompt)
    if not tokens:  # what generate_step raises for an empty prompt (a string that encodes to nothing)
        raise ValueError("Either input_embeddings or prompt (or both) must be provided.")
    detokenizer = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids
    _evaluate_captured([sampler, *(logits_processors or ())])
    request = _Request(tokens, max_tokens, sampler, logits_processors, frozenset(eos))
    tic = time.perf_counter()
    prompt_tps = 0.0
    token, logprobs, n = None, None, 0
    source = _tokens(batch, request)
    try:
        for token, logprobs, last in source:
            if n == 0:
                prompt_tps = len(tokens) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if token in eos:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens or last:
                break
            yield _response(GenerationResponse, text=detokenizer.last_segment, token=token, logprobs=logprobs,
                            from_draft=False, prompt_tokens=len(tokens), prompt_tps=prompt_tps,
                            generation_tokens=n + 1, generation_tps=(n + 1) / (time.perf_counter() - tic),
                            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=None)
            n += 1
        detokenizer.finalize()
        yield _response(GenerationResponse, text=detokenizer.last_segment, token=token, logprobs=logprobs,
                        from_draft=False, prompt_tokens=len(tokens), prompt_tps=prompt_tps,
                        generation_tokens=n + 1, generation_tps=(n + 1) / (time.perf_counter() - tic),
                        peak_memory=mx.get_peak_memory() / 1e9,
                        finish_reason="stop" if token in eos else "length")
    finally:
        source.close()  # ends the request's alone part, if it is in it
        if not request.finished:
            batch.leave(request)  # closed, collected or raised early: its sequence leaves at the next step


def _tokens(batch, request: _Request):
    """(token, logprobs, last) of a request: alone on the calling thread while no batch runs, then from the batch."""
    if batch.start_alone():
        _count("alone")
        if not (yield from _alone(batch, request)):
            return
        _count("moved")
    else:
        batch.join(request)
    while True:
        items = request.items.get()
        if isinstance(items, BaseException):
            request.finished = True
            raise items
        for item in items:
            if item[2]:
                request.finished = True
            yield item


def _alone(batch, request: _Request):
    """Generate as stream_generate does, on this thread, until another call wants the model.

    Returns True once the request has joined the batch (its cache trimmed to the tokens
    before its last one, which the batch feeds next), False when it finished here.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    model = batch.model_ref()
    cache = make_prompt_cache(model)
    steps = generate_step(mx.array(request.prompt), model, max_tokens=request.max_tokens,
                          sampler=request.own_sampler, logits_processors=request.own_processors,
                          prompt_cache=cache)
    generated: List[int] = []
    moving = False
    try:
        for step_token, logprobs in steps:
            token = int(step_token)  # generate_step yields y.item() (typed there as an array)
            generated.append(token)
            last = token in request.eos or len(generated) == request.max_tokens
            yield token, logprobs, last
            if last:
                return False
            moving = batch.running and can_trim_prompt_cache(cache)
            if moving:
                break
        else:
            return False
    finally:
        steps.close()
        batch.end_alone()
        request.finished = not moving
    # The step in flight has already added the last token's keys and values: the batch feeds it again.
    trim_prompt_cache(cache, 1)
    mx.eval([c.state for c in cache])  # read on the batch's Worker
    request.history = request.prompt + generated[:-1]
    request.prompt, request.cache = generated[-1:], cache
    request.max_tokens -= len(generated)
    batch.join(request)
    return True


# ------------------------------------------------------------------ one model's batch, on its Worker


def _next_responses(generator) -> list:
    result = generator.next()
    return list(result[1]) if isinstance(result, tuple) else list(result)


def _generator_size(generator) -> Optional[int]:
    """Sequences the BatchGenerator holds in any stage (mlx-lm 0.31.2+ keeps them in these)."""
    try:
        return (len(generator._unprocessed_sequences) + len(generator._prompt_batch)
                + len(generator._generation_batch))
    except Exception:  # noqa: BLE001 - another release's internals
        return None


class _ModelBatch:
    """One model's batch: a BatchGenerator built and stepped on a Worker while requests are in it.

    Callers hand requests in (`join`) and out (`leave`) under a lock; the Worker's loop
    takes them at its next step. With no request left the loop ends and drops its
    generator (which holds the model); the Worker stays for the next burst and is closed
    when the model is collected.
    """

    def __init__(self, model) -> None:
        self.model_ref = weakref.ref(model)
        self.supported = _caches_merge(model)
        self.alone = False  # a request generates alone on its caller's thread (it moves in when others come)
        self.lock = threading.Lock()
        self.incoming: List[_Request] = []
        self.leaving: List[_Request] = []
        self.running = False
        self.together_at = float("-inf")  # perf_counter() when the batch last held two or more requests
        self.worker: Optional[Any] = None  # a Worker, made at the first join
        self.sequences = 0  # sequences in the generator after the last step (read by stats())
        self.requests = 0

    def join(self, request: _Request) -> None:
        with self.lock:
            self.incoming.append(request)
            if self.running:
                return
            self.running = True
            if self.worker is None or self.worker.closed:
                from .worker import Worker

                self.worker = Worker(f"mlx-batch-{next(_names)}")
            worker = self.worker
        try:
            worker.submit(self._loop)
        except BaseException as error:
            with self.lock:
                self.running = False
                self.incoming.remove(request)
            request.fail(error)

    def start_alone(self) -> bool:
        """Whether a request may start alone: no batch runs, no other request is alone, and,
        on a thread that has not used MLX, no calls came together in the last
        NEW_THREADS_JOIN_WITHIN seconds."""
        if (not streams.has_used_mlx()
                and time.perf_counter() - self.together_at < NEW_THREADS_JOIN_WITHIN):
            return False
        with self.lock:
            if self.running or self.incoming or self.alone or not _moves_in or not START_ALONE:
                return False
            self.alone = True
            return True

    def end_alone(self) -> None:
        with self.lock:
            self.alone = False

    def leave(self, request: _Request) -> None:
        with self.lock:
            if request in self.incoming:
                self.incoming.remove(request)
                _count("left_early")
            elif self.running:
                self.leaving.append(request)

    def close(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.close(wait=False)

    # -- on the Worker ----------------------------------------------------

    def _loop(self) -> None:
        from mlx_lm.generate import BatchGenerator

        from .errors import WorkerClosed
        from .worker import ExitInterrupt

        active: Dict[int, _Request] = {}
        generator: Any = None
        try:
            while True:
                with self.lock:
                    incoming, self.incoming = self.incoming, []
                    leaving, self.leaving = self.leaving, []
                    if not incoming and not active:
                        self.running = False
                        return
                gone = [r.uid for r in leaving if r.uid in active and active.pop(r.uid) is r]
                if gone:
                    generator.remove(gone)
                    _count("left_early", len(gone))
                if incoming:
                    now = time.perf_counter()
                    for request in active.values():  # before the newcomers' prefill, which may take long
                        request.hand_over(now)
                    if generator is None:
                        model = self.model_ref()
                        if model is None:
                            raise RuntimeError("the model was collected while requests were waiting")
                        generator = BatchGenerator(model, max_tokens=max(r.max_tokens for r in incoming))
                        del model
                    moved_in = {}
                    if any(r.cache is not None for r in incoming):
                        moved_in = dict(caches=[r.cache for r in incoming], all_tokens=[r.history for r in incoming])
                    uids = generator.insert([r.prompt for r in incoming],
                                            max_tokens=[r.max_tokens for r in incoming],
                                            samplers=[r.sampler for r in incoming],
                                            logits_processors=[r.logits_processors for r in incoming], **moved_in)
                    for uid, request in zip(uids, incoming):
                        request.uid = uid
                        active[uid] = request
                if not active:
                    continue
                self._step(generator, active)
        except BaseException as error:  # noqa: BLE001 - every caller waiting on this batch gets it
            log.debug("batching: a step failed; its %d requests get the error", len(active), exc_info=True)
            if isinstance(error, ExitInterrupt):  # the process exits while requests are in the batch
                error = WorkerClosed("the batch's worker was stopped with requests in it: the process is exiting")
            with self.lock:
                waiting = list(active.values()) + self.incoming
                self.incoming, self.leaving, self.running = [], [], False
            _count("failed", len(waiting))
            for request in waiting:
                request.fail(error)
        finally:
            self.sequences = self.requests = 0
            if generator is not None:
                generator.close()

    def _step(self, generator, active: Dict[int, _Request]) -> None:
        size = len(active)
        responses = _next_responses(generator)
        now = time.perf_counter()
        if size > 1:
            self.together_at = now
        finished: List[int] = []
        for response in responses:
            request = active.get(response.uid)
            if request is None:
                continue
            if request.error is not None:
                request.fail(request.error)
                del active[response.uid]
                finished.append(response.uid)
                continue
            token = int(response.token)
            last = response.finish_reason is not None or token in request.eos
            request.take(token, response.logprobs, last, now)
            if last:
                del active[response.uid]
                if response.finish_reason is None:
                    finished.append(response.uid)
        if finished:
            generator.remove(finished)
        if responses:
            with _lock:
                _counters["steps"] += 1
                _counters["tokens"] += len(responses)
                if len(responses) > _counters["max_batch_size"]:
                    _counters["max_batch_size"] = len(responses)
        self.requests = len(active)
        sequences = _generator_size(generator)
        self.sequences = size if sequences is None else sequences
