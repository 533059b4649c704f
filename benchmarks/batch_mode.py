"""The batch mode (issue 30): N threads calling stream_generate on one model, against one BatchGenerator.

    python -m benchmarks.measure batch_mode --model tiny|mid-cpu|wide-gpu [--device cpu|gpu] [--smoke]
        [--hand-over 0.003,0.02] [--sides threads_batch_mode,threads_batch_mode_never_alone,lone_caller]

One process, the shim installed. Each round runs, in ABBA order: N threads released
together, each iterating ``stream_generate`` (its own detokenizer, every
GenerationResponse field) with the batch mode on; the same N prompts in one
BatchGenerator driven by one thread (built before the clock starts, as the
shared_model section does), tokens only; the same BatchGenerator with each request's
tokens through a streaming detokenizer of its own (what a batching server does); and,
for context, the N threads with the mode off. Every
request decodes exactly `tokens` tokens (no EOS: a random model hits it at random).
Latency per request is from the burst's start to its last token; p50 / p99 are over
every request of every round. Then a lone caller, mode on against off, ABBA: what one
request alone pays for the mode. ``--sides`` runs only the sides named (and the
BatchGenerator), for a short lease of a GPU.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Sequence
from unittest import mock


def _threads(model, tokenizer, prompts: List[List[int]], tokens: int, pool=None) -> Dict[str, Any]:
    from mlx_lm import stream_generate

    from .measure import requests_released_together

    return requests_released_together(len(prompts), lambda index: [
        r.token for r in stream_generate(model, tokenizer, prompts[index], max_tokens=tokens)], pool)


def _lone(model, tokenizer, tokens: int) -> float:
    from mlx_lm import stream_generate

    from .measure import PROMPT

    start = time.perf_counter()
    count = sum(1 for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens))
    return count / (time.perf_counter() - start)


def _quantile(samples: List[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def batch_mode(path: str, smoke: bool, device: str, tiny: bool,
               hand_over_intervals: Sequence[float] = (), only: Sequence[str] = ()) -> Dict[str, Any]:
    """`only`: run just these sides (the BatchGenerator, every ratio's reference, always runs);
    "lone_caller" names the lone-caller comparison. Empty: everything."""
    import mlx_threadsafe
    from mlx_threadsafe import batching

    from .measure import batched_requests as _batched_requests
    from .measure import load_lm as _load
    from .measure import request_prompt

    model, tokenizer = _load(path)
    tokenizer.eos_token_ids = set()  # exactly `tokens` per request on every side
    n = 2 if smoke else 8
    tokens = 8 if smoke else (128 if tiny or device == "gpu" else 48)
    rounds = 2 if smoke else (8 if tiny or device == "gpu" else 6)
    prompts = [request_prompt(i) for i in range(n)]

    def threads_on():
        mlx_threadsafe.install(batch=True)
        return _threads(model, tokenizer, prompts, tokens)

    pool = ThreadPoolExecutor(n, thread_name_prefix="pooled-request")

    def threads_on_pooled():
        mlx_threadsafe.install(batch=True)
        return _threads(model, tokenizer, prompts, tokens, pool)

    def threads_on_with(setting: str, value: Any) -> Callable[[], Dict[str, Any]]:
        """The threads with the mode and one of batching's settings changed for the side."""
        def side():
            mlx_threadsafe.install(batch=True)
            with mock.patch.object(batching, setting, value):
                return _threads(model, tokenizer, prompts, tokens)

        return side

    hand_over_sides = {f"threads_batch_mode_hand_over_{interval * 1e3:g}ms": interval
                       for interval in hand_over_intervals}

    def threads_off():
        mlx_threadsafe.install(batch=False)
        return _threads(model, tokenizer, prompts, tokens)

    def batch():
        return _batched_requests(model, prompts, tokens)

    def batch_with_text():
        return _batched_requests(model, prompts, tokens, tokenizer)

    sides = {"threads_batch_mode": threads_on, "threads_batch_mode_pooled": threads_on_pooled,
             # every call joins the batch, none starts alone
             "threads_batch_mode_never_alone": threads_on_with("START_ALONE", False),
             "threads_batch_mode_every_step": threads_on_with("HAND_OVER_INTERVAL", 0.0),
             # a thread new to MLX never starts alone (the window never closes)
             "threads_batch_mode_new_threads_join": threads_on_with("NEW_THREADS_JOIN_WITHIN", float("inf")),
             **{name: threads_on_with("HAND_OVER_INTERVAL", interval) for name, interval in hand_over_sides.items()},
             "batch_generator": batch,
             "batch_generator_with_text": batch_with_text, "threads_mode_off": threads_off}
    if only:
        unknown = set(only) - set(sides) - {"lone_caller"}
        if unknown:
            raise SystemExit(f"unknown sides {sorted(unknown)}; known: {sorted(sides)} and lone_caller")
        sides = {name: side for name, side in sides.items() if name in only or name == "batch_generator"}
    for side in sides.values():  # warm-up: compile caches, allocator, the batch Worker
        side()
    batching.reset_stats()
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in sides}
    for round_index in range(rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            runs[name].append(sides[name]())
    stats = batching.stats()
    reference = runs["batch_generator"][0]["outputs"]
    results: Dict[str, Any] = {"n": n, "tokens": tokens, "rounds": rounds}
    for name, samples in runs.items():
        latencies = [t for run in samples for t in run["finished"]]
        results[name] = {
            "tokens_per_s": statistics.median(n * tokens / max(run["finished"]) for run in samples),
            "latency_p50_ms": _quantile(latencies, 0.5) * 1e3,
            "latency_p99_ms": _quantile(latencies, 0.99) * 1e3,
            "requests_equal_to_batch_generator": min(sum(g == w for g, w in zip(run["outputs"], reference))
                                                     for run in samples),
            "errors": [e for run in samples for e in run["errors"]][:5],
            "samples_tokens_per_s": [n * tokens / max(run["finished"]) for run in samples],
        }
    def paired_ratio(side: str, against: str) -> float:
        """Median over the rounds of side's tokens/s over against's (the same tokens: the inverse time ratio)."""
        return statistics.median(max(b["finished"]) / max(a["finished"]) for a, b in zip(runs[side], runs[against]))

    ratios = {"threads_over_batch_generator": ("threads_batch_mode", "batch_generator"),
              "never_alone_over_batch_generator": ("threads_batch_mode_never_alone", "batch_generator"),
              "pooled_threads_over_batch_generator": ("threads_batch_mode_pooled", "batch_generator"),
              "every_step_over_batch_generator": ("threads_batch_mode_every_step", "batch_generator"),
              "new_threads_join_over_batch_generator": ("threads_batch_mode_new_threads_join", "batch_generator"),
              **{f"{name}_over_batch_generator": (name, "batch_generator") for name in hand_over_sides},
              "threads_over_batch_generator_with_text": ("threads_batch_mode", "batch_generator_with_text"),
              "batch_mode_over_mode_off": ("threads_batch_mode", "threads_mode_off")}
    for ratio, (side, against) in ratios.items():
        if side in runs and against in runs:
            results[ratio] = paired_ratio(side, against)
    results["hand_over_interval_s"] = batching.HAND_OVER_INTERVAL
    results["batch_stats"] = stats
    pool.shutdown()
    if only and "lone_caller" not in only:
        return results

    # One caller alone: the mode on against off, ABBA, in this process; and that caller in a batch
    # of one (what a thread new to MLX joins while calls come together), against off too.
    lone_tokens, lone_rounds = (16, 2) if smoke else (512 if tiny else 64, 16 if tiny else 8)
    rates: Dict[str, List[float]] = {"off": [], "on": [], "batch_of_one": []}
    for round_index in range(lone_rounds):
        for mode in list(rates) if round_index % 2 == 0 else list(reversed(rates)):
            mlx_threadsafe.install(batch=mode != "off")
            with mock.patch.object(batching, "START_ALONE", mode != "batch_of_one"):
                rates[mode].append(_lone(model, tokenizer, lone_tokens))
    mlx_threadsafe.install(batch=False)

    def over_off(mode: str) -> float:
        return statistics.median(rate / off for rate, off in zip(rates[mode], rates["off"]))

    results["lone_caller"] = {
        "tokens": lone_tokens, "off": statistics.median(rates["off"]), "on": statistics.median(rates["on"]),
        "ratio": over_off("on"), "batch_of_one_over_off": over_off("batch_of_one"), "samples": rates}
    return results
