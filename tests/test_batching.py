"""The batch mode (issue 30): threads that share one model join one BatchGenerator.

Each test runs in a fresh interpreter (install() is global state) on real MLX with the
tiny random-weight llama of mlx_threadsafe.testing. Every test that expects a batch
also checks that one formed (calls counted as batched, the largest batch > 1), so it
fails if the calls silently ran one at a time.
"""

import textwrap

import pytest
from helpers import run_json

SETUP = """
    import json, threading, time, gc
    import mlx.core as mx
    import mlx_threadsafe
    from mlx_threadsafe import batching
    mlx_threadsafe.install({install_args})
    import mlx_lm
    from mlx_lm import load, stream_generate, generate
    from mlx_lm.generate import BatchGenerator
    from mlx_threadsafe.testing import build_lm
    model, tokenizer = load(str(build_lm("llama")))

    def prompt(i):
        return [5 + (i * 7 + j) % 280 for j in range(6 + i % 4)]

    def in_threads(fn, n):
        out, errors = [None] * n, []
        gate = threading.Barrier(n)
        def run(i):
            gate.wait()
            try:
                out[i] = fn(i)
            except Exception as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        return out

    def wait_until(condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, batching.stats()
            time.sleep(0.01)
"""


def _run(body: str, install_args: str = "batch=True", **kwargs):
    return run_json(textwrap.dedent(SETUP.format(install_args=install_args)) + textwrap.dedent(body), **kwargs)


def test_eight_threads_join_one_batch_and_greedy_outputs_equal_a_batch_generator():
    out = _run("""
        T = 24
        def reference(prompts):
            gen = BatchGenerator(model, max_tokens=T, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
            uids = gen.insert(prompts, max_tokens=[T] * len(prompts))
            got = {u: [] for u in uids}
            while True:
                result = gen.next()
                prompt_responses, responses = result if isinstance(result, tuple) else ([], result)
                if not prompt_responses and not responses:
                    break
                for r in responses:
                    got[r.uid].append(int(r.token))
            gen.close()
            return [got[u] for u in uids]
        want = reference([prompt(i) for i in range(8)])
        responses = in_threads(lambda i: list(stream_generate(model, tokenizer, prompt(i), max_tokens=T)), 8)
        texts = in_threads(lambda i: generate(model, tokenizer, prompt(i), max_tokens=T), 8)
        print(json.dumps({
            "equal": [[r.token for r in rs] == w for rs, w in zip(responses, want)],
            "last": [rs[-1].finish_reason for rs in responses],
            "lengths": [len(w) for w in want],
            "texts": [t == "".join(r.text for r in rs) for t, rs in zip(texts, responses)],
            "stats": batching.stats()}))
    """)
    stats = out["stats"]
    assert stats["batched_calls"] == 16 and stats["direct_calls"] == 0, stats
    assert stats["max_batch_size"] > 1, stats  # a batch formed: not 8 calls one at a time
    assert all(out["equal"]), out
    assert all(reason in ("stop", "length") for reason in out["last"]), out
    assert all(out["texts"]), out
    assert stats["sequences_in_batches"] == 0 and stats["requests_in_batches"] == 0, stats


def test_a_call_yields_the_fields_it_yields_without_the_mode():
    out = _run("""
        import dataclasses
        def fields(responses):
            return [(r.text, r.token, r.finish_reason, r.prompt_tokens, r.generation_tokens, r.from_draft)
                    for r in responses]
        sampler_calls = []
        def sampler(logprobs):  # one caller's own sampler: greedy, and it records its calls
            sampler_calls.append(logprobs.shape)
            return mx.argmax(logprobs, axis=-1)
        runs = {}
        for on in (True, False):
            mlx_threadsafe.install(batch=on)
            for text_prompt in ("w1 w2 w3", "w9"):
                responses = list(stream_generate(model, tokenizer, text_prompt, max_tokens=12, sampler=sampler))
                runs.setdefault(text_prompt, []).append(responses)
        same_logprobs = all(mx.allclose(a.logprobs, b.logprobs, atol=1e-5).item()
                            for on, off in runs.values() for a, b in zip(on, off))
        first = runs["w1 w2 w3"][0][0]
        print(json.dumps({
            "same": [fields(on) == fields(off) for on, off in runs.values()],
            "same_logprobs": same_logprobs,
            "field_names": sorted(f.name for f in dataclasses.fields(first)),
            "speeds": [first.prompt_tps > 0, first.generation_tps > 0, first.peak_memory >= 0],
            "sampler_rows": sorted(set(s[0] for s in sampler_calls)),
            "stats": batching.stats()}))
    """)
    assert all(out["same"]) and out["same_logprobs"], out
    assert all(out["speeds"]), out
    assert out["sampler_rows"] == [1], out  # its own sampler, on its own row
    assert out["stats"]["batched_calls"] == 2, out["stats"]
    assert out["stats"]["started_alone"] == 2 and out["stats"]["moved_into_batch"] == 0, out["stats"]


def test_the_worker_hands_over_the_first_token_at_once_and_the_rest_in_bunches_changing_nothing_else():
    """HAND_OVER_INTERVAL: fewer wake-ups of the callers, the same tokens, and an error after them."""
    out = _run("""
        batching.START_ALONE = False  # every call in the batch: the processors below run on its Worker
        no_eos = mx.where(mx.arange(300) == 2, -1e9, 0.0)
        mx.eval(no_eos)

        def caller(i, fail_at=None, every_step=False):
            received, calls = [threading.Event(), threading.Event()], []
            def processor(tokens, logits):
                calls.append(1)
                if fail_at is not None and len(calls) == fail_at:
                    raise ValueError("processor")
                # The Worker waits for this caller's first token (and, handing over every step, its
                # second): each must come at once, or the call times out.
                if len(calls) == 3 or (every_step and len(calls) == 5):
                    assert received[len(calls) // 5].wait(30), "a token was not handed over at once"
                return logits + no_eos
            tokens, calls_at_second = [], None
            try:
                for r in stream_generate(model, tokenizer, prompt(i), max_tokens=40, logits_processors=[processor]):
                    tokens.append(r.token)
                    received[min(len(tokens), 2) - 1].set()
                    if len(tokens) == 2:
                        calls_at_second = len(calls)
            except ValueError as error:
                tokens.append(str(error))
            return {"tokens": tokens, "calls_at_second": calls_at_second, "calls": len(calls)}

        runs = {}
        for interval in (60.0, 0.0):
            batching.HAND_OVER_INTERVAL = interval
            runs[interval] = in_threads(lambda i: caller(i, 12 if i == 1 else None, interval == 0.0), 2)
        print(json.dumps({"runs": {str(k): v for k, v in runs.items()}, "stats": batching.stats()}))
    """)
    bunched, every_step = out["runs"]["60.0"], out["runs"]["0.0"]
    assert [r["tokens"] for r in bunched] == [r["tokens"] for r in every_step], out  # the same tokens, the error last
    assert len(bunched[0]["tokens"]) == 40 and bunched[1]["tokens"][-1] == "processor", out
    assert len(bunched[1]["tokens"]) > 5, out  # the tokens computed before the error came first
    # With a 60 s interval, tokens 2..40 came together, once the last was computed.
    assert bunched[0]["calls_at_second"] == bunched[0]["calls"], out
    assert every_step[0]["calls_at_second"] <= 5, out
    assert out["stats"]["max_batch_size"] == 2, out["stats"]


def test_a_call_that_started_alone_moves_into_the_batch_when_others_come():
    out = _run("""
        no_eos = mx.where(mx.arange(300) == 2, -1e9, 0.0)
        mx.eval(no_eos)
        seen = []  # the lengths of the token history its logits processor is given, step by step
        def processor(tokens, logits):
            seen.append(int(tokens.shape[-1]))
            return logits + no_eos
        gen_module = __import__("importlib").import_module("mlx_lm.generate")
        wrapped = gen_module.stream_generate.__wrapped__
        want = [r.token for r in wrapped(model, tokenizer, prompt(0), max_tokens=40, logits_processors=[processor])]
        seen.clear()
        first, others_started = [], threading.Event()
        def long_caller():
            for r in stream_generate(model, tokenizer, prompt(0), max_tokens=40, logits_processors=[processor]):
                first.append(r.token)
                if len(first) == 3:
                    others_started.wait(30)
                    wait_until(lambda: batching.stats()["requests_in_batches"] > 0)  # the others' batch runs
        thread = threading.Thread(target=long_caller)
        thread.start()
        wait_until(lambda: len(first) >= 3)
        alone_then = batching.stats()
        others_started.set()
        in_threads(lambda i: list(stream_generate(model, tokenizer, prompt(i + 1), max_tokens=300)), 4)
        thread.join()
        print(json.dumps({"equal": first == want, "first": first, "want": want, "seen": seen,
                          "prompt": len(prompt(0)), "alone_then": alone_then, "stats": batching.stats()}))
    """)
    stats = out["stats"]
    assert out["alone_then"]["started_alone"] == 1 and out["alone_then"]["sequences_in_batches"] == 0, out
    assert stats["moved_into_batch"] == 1 and stats["max_batch_size"] > 1, stats
    assert out["equal"], out  # greedy, float32 on the CPU: the same tokens as one call alone
    # Its processor saw the whole history on both sides of the move, one more token each step (and, as
    # without the mode, a last look-ahead step). Once, at the move, it saw a step twice: the step in flight
    # when it moved, dropped, and computed again in the batch.
    seen = out["seen"]
    steps = [length for i, length in enumerate(seen) if i == 0 or length != seen[i - 1]]
    assert steps == list(range(out["prompt"], out["prompt"] + 41)) and len(seen) == len(steps) + 1, out
    assert stats["sequences_in_batches"] == 0 and stats["requests_in_batches"] == 0, stats


def test_while_calls_come_together_a_thread_new_to_mlx_joins_the_batch_and_after_a_quiet_spell_starts_alone():
    out = _run("""
        from concurrent.futures import ThreadPoolExecutor
        batching.NEW_THREADS_JOIN_WITHIN = 0.5
        def counts():
            s = batching.stats()
            return [s["started_alone"], s["batched_calls"]]
        def counted(call):
            batching.reset_stats()
            call()
            return counts()
        lone = lambda: list(stream_generate(model, tokenizer, prompt(1), max_tokens=8))
        pool = ThreadPoolExecutor(1)  # its thread calls only with the mode on: it uses no MLX while it joins
        first = list(stream_generate(model, tokenizer, prompt(0), max_tokens=8))  # the main thread, cold
        before_any_batch = counts()
        in_threads(lambda i: list(stream_generate(model, tokenizer, prompt(i), max_tokens=64)), 4)
        came_together = time.perf_counter()
        right_after = counted(lambda: pool.submit(lone).result())
        while time.perf_counter() - came_together < batching.NEW_THREADS_JOIN_WITHIN:
            pool.submit(lone).result()  # batches of one: they hold one request, the window is not renewed
        after_quiet = counted(lambda: pool.submit(lone).result())
        pool_thread_warm = counted(lambda: pool.submit(lone).result())
        second = list(stream_generate(model, tokenizer, prompt(0), max_tokens=8))  # the main thread, warm now
        print(json.dumps({"before_any_batch": before_any_batch, "right_after": right_after,
                          "after_quiet": after_quiet, "pool_thread_warm": pool_thread_warm,
                          "same": [r.token for r in first] == [r.token for r in second]}))
    """)
    assert out["before_any_batch"] == [1, 1], out  # no batch yet: a lone caller starts alone, cold or not
    assert out["right_after"] == [0, 1], out  # a thread new to MLX, calls just came together: a batch of one
    assert out["after_quiet"] == [1, 1], out  # the same thread once the window passed: alone, as without the mode
    assert out["pool_thread_warm"] == [1, 1], out  # it has used MLX now: alone whatever the window
    assert out["same"], out


def test_with_the_mode_off_calls_run_as_before_and_nothing_is_batched():
    out = _run("""
        gen_module = __import__("importlib").import_module("mlx_lm.generate")
        wrapped = gen_module.stream_generate.__wrapped__
        direct = [[r.token for r in wrapped(model, tokenizer, prompt(i), max_tokens=16)] for i in range(4)]
        threaded = in_threads(
            lambda i: [r.token for r in stream_generate(model, tokenizer, prompt(i), max_tokens=16)], 4)
        handed_back = stream_generate(model, tokenizer, prompt(0), max_tokens=4)
        print(json.dumps({"equal": threaded == direct, "stats": batching.stats(),
                          "original_generator": handed_back.gi_code is wrapped.__code__,
                          "applied": str(mlx_threadsafe.status()["mlx_lm.stream_generate.batch"].state)}))
    """, install_args="")
    assert out["applied"] == "applied"
    assert out["equal"] and out["original_generator"], out
    assert out["stats"]["enabled"] is False and out["stats"]["batched_calls"] == 0, out["stats"]


def test_callers_that_stop_early_raise_or_are_collected_leave_no_sequence_behind():
    out = _run("""
        no_eos = mx.where(mx.arange(300) == 2, -1e9, 0.0)
        mx.eval(no_eos)  # read on other threads
        stop_long = threading.Event()
        long_tokens = []
        def long_caller():  # keeps the batch stepping while the others come and go
            for r in stream_generate(model, tokenizer, prompt(0), max_tokens=100000,
                                     logits_processors=[lambda tokens, logits: logits + no_eos]):
                long_tokens.append(r.token)
                if stop_long.is_set():
                    break
        long_thread = threading.Thread(target=long_caller)
        long_thread.start()
        wait_until(lambda: len(long_tokens) > 2)

        def breaks_early(i):
            for n, r in enumerate(stream_generate(model, tokenizer, prompt(i), max_tokens=5000)):
                if n == 2:
                    break
        def raises(i):
            try:
                for r in stream_generate(model, tokenizer, prompt(i), max_tokens=5000):
                    raise KeyError("caller")
            except KeyError:
                return "raised"
        def abandoned(i):
            g = stream_generate(model, tokenizer, prompt(i), max_tokens=5000)
            next(g)
            del g
            gc.collect()
        def processor_raises(i):
            def bad(tokens, logits):
                raise ValueError("processor")
            try:
                list(stream_generate(model, tokenizer, prompt(i), max_tokens=5000, logits_processors=[bad]))
            except ValueError as error:
                return str(error)
        results = in_threads(lambda i: [breaks_early, raises, abandoned, processor_raises][i % 4](i + 1), 8)
        wait_until(lambda: batching.stats()["sequences_in_batches"] == 1)
        while_long = batching.stats()
        stop_long.set()
        long_thread.join()
        wait_until(lambda: batching.stats()["sequences_in_batches"] == 0)
        print(json.dumps({"results": results, "while_long": while_long, "after": batching.stats(),
                          "long_tokens": len(long_tokens)}))
    """)
    while_long, after = out["while_long"], out["after"]
    assert out["results"][1::4] == ["raised", "raised"] and out["results"][3::4] == ["processor", "processor"], out
    assert while_long["sequences_in_batches"] == 1 and while_long["requests_in_batches"] == 1, while_long
    assert while_long["max_batch_size"] > 1, while_long  # they did share the batch with the long caller
    assert after["sequences_in_batches"] == 0 and after["requests_in_batches"] == 0, after
    assert after["left_early"] >= 7, after  # 6 callers that stopped + the long one (2 processor errors: failed)


def test_calls_a_batch_cannot_serve_run_directly_and_are_counted():
    out = _run("""
        from mlx_lm.models.cache import make_prompt_cache
        gen_module = __import__("importlib").import_module("mlx_lm.generate")
        wrapped = gen_module.stream_generate.__wrapped__
        want = [r.token for r in wrapped(model, tokenizer, prompt(1), max_tokens=8)]
        got = {
            "prompt_cache": [r.token for r in stream_generate(model, tokenizer, prompt(1), max_tokens=8,
                                                               prompt_cache=make_prompt_cache(model))],
            "max_kv_size": [r.token for r in stream_generate(model, tokenizer, prompt(1), max_tokens=8,
                                                              max_kv_size=64)],
            "draft_model": [r.token for r in stream_generate(model, tokenizer, prompt(1), max_tokens=8,
                                                              draft_model=model)],
        }
        print(json.dumps({"same": {k: v == want for k, v in got.items()}, "stats": batching.stats()}))
    """)
    stats = out["stats"]
    assert all(out["same"].values()), out
    assert stats["direct_calls"] == 3 and stats["batched_calls"] == 0, stats
    assert stats["direct_reasons"] == {"prompt_cache": 1, "max_kv_size": 1, "draft_model": 1}, stats


@pytest.mark.parametrize("how", ["install", "env", "off"])
def test_the_mode_is_turned_on_by_install_or_the_environment(how):
    args = {"install": "batch=True", "env": "", "off": ""}[how]
    env = {"MLX_THREADSAFE_BATCH": "1"} if how == "env" else {}
    out = _run("""
        list(stream_generate(model, tokenizer, prompt(0), max_tokens=2))
        print(json.dumps(batching.stats()))
    """, install_args=args, env=env)
    assert out["enabled"] is (how != "off") and out["batched_calls"] == (0 if how == "off" else 1), out


def test_the_pytest_plugin_option_turns_the_mode_on(pytester):
    pytester.makepyfile("""
        def test_batched(mlx_tiny_model):
            from mlx_threadsafe import batching
            from mlx_lm import generate
            tiny = mlx_tiny_model("llama")
            generate(tiny.model, tiny.tokenizer, "w1 w2", max_tokens=3)
            assert batching.stats()["batched_calls"] == 1
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--mlx-threadsafe-batch", timeout=600)
    result.assert_outcomes(passed=1)


ASYNC_APP = """
    import asyncio
    # An unchanged FastAPI-style handler: each request runs generate() on asyncio.to_thread.
    async def handle(i):
        started = time.perf_counter()
        text = await asyncio.to_thread(generate, model, tokenizer, prompt(i), max_tokens=T)
        return text, time.perf_counter() - started

    async def serve(n):
        return await asyncio.gather(*(handle(i) for i in range(n)))

    tokenizer.eos_token_ids = set()  # every request decodes T tokens: the same work both ways
    T, N = 48, 8
    asyncio.run(serve(2))  # warm-up
    rates = {"off": [], "on": []}
    outputs = {}
    for r in range(4):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            mlx_threadsafe.install(batch=(mode == "on"))
            start = time.perf_counter()
            results = asyncio.run(serve(N))
            rates[mode].append(N * T / (time.perf_counter() - start))
            outputs.setdefault(mode, [text for text, _ in results])
    ratio = sorted(on / off for on, off in zip(rates["on"], rates["off"]))
    print(json.dumps({"ratio_median": (ratio[1] + ratio[2]) / 2, "rates": rates, "stats": batching.stats(),
                      "same_texts": sum(a == b for a, b in zip(outputs["on"], outputs["off"]))}))
"""


def test_an_asyncio_to_thread_app_calling_generate_gains_from_the_batch():
    out = _run(ASYNC_APP, install_args="")
    stats = out["stats"]
    assert stats["max_batch_size"] > 1 and stats["batched_calls"] >= 8 * 2, stats
    assert out["ratio_median"] > 1.0, out  # on the 2-core CPU: measured 1.5-2.5x
