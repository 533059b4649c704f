"""One measurement per call, in a fresh process so patched and unpatched runs never mix:

    python -m benchmarks.measure SECTION --model NAME [--shim] [--device cpu|gpu] [--smoke] [--own-model]

prints one JSON line. The driver (`python -m benchmarks`) interleaves the patched and
unpatched processes and turns their numbers into ratios. Sections that compare two ways
of using the shim (shared_model: threads or a batch; handover: a generator driven on its
building thread or moved to a Worker) alternate them within one process, as generation
does; thread_churn compares processes without and with the shim.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SMALL = dict(model_type="llama", num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
              rope_theta=10000.0, vocab_size=300, tie_word_embeddings=True)
MODELS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(_SMALL, hidden_size=64, num_hidden_layers=2, intermediate_size=128),
    "mid-cpu": dict(_SMALL, hidden_size=512, num_hidden_layers=8, intermediate_size=1536),
    # the H100 measurement quoted in the brief: a 2048-wide 8-layer llama in bf16
    "wide-gpu": dict(_SMALL, hidden_size=2048, num_hidden_layers=8, intermediate_size=5632,
                     num_attention_heads=16, num_key_value_heads=16),
}
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def model_dir(name: str, device: str) -> str:
    from mlx_threadsafe.testing import build_lm_from_config

    return str(build_lm_from_config(f"bench-{name}", MODELS[name], dtype="bfloat16" if device == "gpu" else None))


def load_lm(path: str):
    from mlx_lm import load

    return load(path)


def _decode(model, tokens: int) -> None:
    """Exactly `tokens` greedy steps (no early stop at EOS: random models hit it at random)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    for (_, _), _ in zip(generate_step(mx.array(PROMPT), model, max_tokens=tokens), range(tokens)):
        pass


def generation(path: str, smoke: bool, device: str, tiny: bool = False) -> Dict[str, Any]:
    """Single-thread decode speed, unpatched and patched in turn within one process.

    install() and uninstall() between repetitions switch the shim on and off exactly
    (the originals come back), so both sides share one model, one device context and
    the same drift of the machine; the ratio is the median of the paired repetitions.
    """
    import mlx_threadsafe

    model, _ = load_lm(path)
    # About 0.3 s a repetition or more: the tiny model on the CPU (0.7 ms a token) gets 512
    # tokens, or scheduler noise on 2 cores spreads the pairs by several percent.
    tokens, rounds = (16, 2) if smoke else (256 if device == "gpu" else 512 if tiny else 128, 32)
    _decode(model, 8)  # warm-up: compile caches, allocator
    rates: Dict[str, List[float]] = {"unpatched": [], "patched": []}
    for round_index in range(rounds):
        # ABBA order: whichever side runs second in a pair must not always be the same one
        for side in ("unpatched", "patched") if round_index % 2 == 0 else ("patched", "unpatched"):
            mlx_threadsafe.install() if side == "patched" else mlx_threadsafe.uninstall()
            start = time.perf_counter()
            _decode(model, tokens)
            rates[side].append(tokens / (time.perf_counter() - start))
    mlx_threadsafe.uninstall()
    ratios = [p / u for u, p in zip(rates["unpatched"], rates["patched"])]
    return {"unpatched": statistics.median(rates["unpatched"]), "patched": statistics.median(rates["patched"]),
            "ratio": statistics.median(ratios), "samples": rates}


def _percentiles(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": ordered[len(ordered) // 2] * 1e6, "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6}


def round_trip(smoke: bool, pinned: bool) -> Dict[str, Any]:
    """Hop latency of a no-op: direct call, ThreadPoolExecutor(1), Worker.call.

    Pinned, every thread shares one core, so the numbers compare the code paths; unpinned,
    they also carry where the scheduler happens to put each thread (which differs from
    thread to thread by 2x on a 2-core machine).
    """
    if pinned and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # threads made later inherit it
    from mlx_threadsafe import Worker

    calls = 300 if smoke else 5000

    def noop() -> None:
        return None

    pool = ThreadPoolExecutor(1)
    with Worker(name="bench") as worker:
        dispatchers = {"direct": noop, "thread_pool_executor": lambda: pool.submit(noop).result(),
                       "worker": lambda: worker.call(noop)}
        samples: Dict[str, List[float]] = {name: [] for name in dispatchers}
        # one call of each in turn: thread wake-up latency swings with where the scheduler
        # puts the threads (2x on a 2-core machine), so every method must see the same swings
        for call in range(calls + 200):
            for name, dispatch in dispatchers.items():
                start = time.perf_counter()
                dispatch()
                if call >= 200:  # the first calls warm up
                    samples[name].append(time.perf_counter() - start)
        results = {name: _percentiles(values) for name, values in samples.items()}
    pool.shutdown()
    return results


# One fresh process per sample: the import and install() of a process that has not
# imported mlx yet, then what install() put off (the planning, at the first MLX import
# or the first read of the status), next to mlx_lm's own import.
_INSTALL_SAMPLE = """
import json, sys, time
start = time.perf_counter()
import mlx_threadsafe
imported = time.perf_counter()
mlx_threadsafe.install()
installed = time.perf_counter()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "mlx_vlm", "transformers", "wrapt"))
mlx_threadsafe.status()
planned = time.perf_counter()
import mlx_lm
mlx_lm_imported = time.perf_counter()
print(json.dumps([imported - start, installed - imported, planned - installed, mlx_lm_imported - planned, heavy]))
"""


_PYCACHE = os.path.join(tempfile.gettempdir(), "mlx-threadsafe-bench-pycache")


def _installed_env(**changes: str) -> Dict[str, str]:
    """The environment of a start-up sample: bytecode cached, as pip leaves an installed package.

    An editable install (or PYTHONDONTWRITEBYTECODE, set on some machines) would make every
    sample compile the package and its dependencies from source, which no installed
    application does. Each measurement runs its command once first, to fill the cache.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "MLX_THREADSAFE")}
    return dict(env, PYTHONPYCACHEPREFIX=_PYCACHE, **changes)


def install_cost(samples: int = 15) -> Dict[str, Any]:
    """Import and install() times (medians of fresh processes), and the modules they add to an mlx-lm application."""
    import subprocess

    def sample() -> List[Any]:
        done = subprocess.run([sys.executable, "-c", _INSTALL_SAMPLE], capture_output=True, text=True, check=True,
                              env=_installed_env())
        return json.loads(done.stdout.strip().splitlines()[-1])

    sample()  # fills the bytecode cache
    runs = [sample() for _ in range(samples)]
    median_ms = [statistics.median(run[index] for run in runs) * 1e3 for index in range(4)]
    # What the shim adds to a process that already imported mlx_lm (the application it serves).
    code = ("import sys, json, mlx_lm; before = set(sys.modules); import mlx_threadsafe; mlx_threadsafe.install(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    added = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    return {"import_ms": median_ms[0], "install_ms": median_ms[1], "planning_ms": median_ms[2],
            "mlx_lm_import_ms": median_ms[3], "samples": samples, "imported_heavy": runs[-1][4],
            "added_to_mlx_lm_app": added}


def startup_hook_cost() -> Dict[str, Any]:
    """The .pth line's cost with MLX_THREADSAFE unset, next to the interpreter's own start-up."""
    import subprocess
    import timeit

    from mlx_threadsafe.bootstrap import DIRECTORY

    with open(os.path.join(DIRECTORY, "mlx_threadsafe-autoinstall.pth")) as hook:
        line = compile(hook.read(), "mlx_threadsafe-autoinstall.pth", "exec")
    os.environ.pop("MLX_THREADSAFE", None)
    runs = 100000
    per_line_s = timeit.timeit(lambda: exec(line, {}), number=runs) / runs
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=_installed_env())  # fills the bytecode cache
    starts = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=_installed_env())
        starts.append(time.perf_counter() - start)
    interpreter_start_s = statistics.median(starts)
    return {"hook_line_us": per_line_s * 1e6, "interpreter_start_ms": interpreter_start_s * 1e3,
            "share_of_start": per_line_s / interpreter_start_s, **_startup_with_the_variable()}


def _startup_with_the_variable(pairs: int = 15) -> Dict[str, Any]:
    """Whole `python -c pass` processes, MLX_THREADSAFE=1 and unset, in ABBA order."""
    import subprocess

    def start(variable: bool) -> float:
        env = _installed_env(MLX_THREADSAFE="1") if variable else _installed_env()
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
        return time.perf_counter() - began

    for variable in (True, False):  # fill the bytecode cache
        start(variable)
    ratios, bare, hooked = [], [], []
    for index in range(pairs):
        order = (False, True) if index % 2 == 0 else (True, False)
        times = {variable: start(variable) for variable in order}
        bare.append(times[False])
        hooked.append(times[True])
        ratios.append(times[True] / times[False])
    return {"variable_set_ratio": statistics.median(ratios), "variable_set_ms": statistics.median(hooked) * 1e3,
            "variable_unset_ms": statistics.median(bare) * 1e3, "variable_pairs": pairs}


def materialize_cost(path: str) -> Dict[str, Any]:
    from mlx_threadsafe import materialize

    loads, costs = [], []
    for _ in range(3):
        start = time.perf_counter()
        model, _ = load_lm(path)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        count = materialize(model)
        costs.append(time.perf_counter() - start)
    load_s, materialize_s = statistics.median(loads), statistics.median(costs)
    return {"load_ms": load_s * 1e3, "materialize_ms": materialize_s * 1e3, "arrays": count,
            "share_of_load": materialize_s / load_s}


def concurrency(path: str, shim: bool, smoke: bool, device: str) -> Dict[str, Any]:
    """K models, each with its own requests: serial, raw threads, a global lock, or owner Workers."""
    tokens, requests = (8, 2) if smoke else ((128, 8) if device == "gpu" else (64, 4))
    results: Dict[str, Any] = {}
    for k in (1, 2, 4):
        modes = ["workers"] if shim else ["serial", "raw_threads", "global_lock"]
        for mode in modes:
            results[f"{mode}/K={k}"] = _concurrent_run(path, k, mode, tokens, requests)
    return results


def _concurrent_run(path: str, k: int, mode: str, tokens: int, requests: int) -> Dict[str, Any]:
    latencies: List[float] = []
    lock = threading.Lock()

    def serve(model, guard=None) -> None:
        for _ in range(requests):
            start = time.perf_counter()
            if guard is None:
                _decode(model, tokens)
            else:
                with guard:
                    _decode(model, tokens)
            latencies.append(time.perf_counter() - start)

    if mode == "workers":
        from mlx_threadsafe import Worker

        workers = [Worker(name=f"model-{i}") for i in range(k)]
        models = [w.call(lambda: load_lm(path)[0]) for w in workers]  # each model loaded on its owner
        for w, m in zip(workers, models):
            w.call(_decode, m, 4)
        start = time.perf_counter()
        futures = [w.submit(serve, m) for w, m in zip(workers, models)]
        for future in futures:
            future.result()
        wall = time.perf_counter() - start
        for w in workers:
            w.close()
    else:
        models = [load_lm(path)[0] for _ in range(k)]
        for m in models:
            _decode(m, 4)
        start = time.perf_counter()
        if mode == "serial":
            for m in models:
                serve(m)
        else:
            threads = [threading.Thread(target=serve, args=(m, lock if mode == "global_lock" else None))
                       for m in models]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall = time.perf_counter() - start
    return {"tokens_per_s": k * requests * tokens / wall, "latency_p50_ms": statistics.median(latencies) * 1e3,
            "latency_max_ms": max(latencies) * 1e3}


# ------------------------------------------------------------------ the device, named


def measured_on(device: str) -> Dict[str, Any]:
    """What ran a section: the device's own name (``mx.device_info``), the versions, the CPUs.

    Stored with each section that may be re-measured alone (``--only``) on another machine
    than the full run's, so the report can name the device of every figure.
    """
    import mlx.core as mx

    from harness.evidence import machine
    from mlx_threadsafe import versions

    try:
        name = str(mx.device_info(mx.gpu if device == "gpu" else mx.cpu).get("device_name", ""))
    except Exception:  # noqa: BLE001 - an mlx without device_info
        name = ""
    return machine(device_name=name or device, describe=versions.detect().describe())


# ------------------------------------------------------------------ one model shared: threads or a batch


def request_prompt(index: int) -> List[int]:
    """Request `index`'s prompt: its own tokens and one of four lengths (6-9), so a batch pads."""
    return [5 + (index * 7 + j) % 280 for j in range(6 + index % 4)]


def _greedy_tokens(model, prompt: List[int], tokens: int) -> List[int]:
    """Exactly `tokens` greedy tokens of one request (generate_step: no early stop at EOS)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=tokens)]


def _serial_requests(model, prompts: List[List[int]], tokens: int) -> Dict[str, Any]:
    start = time.perf_counter()
    outputs, finished = [], []
    for prompt in prompts:
        outputs.append(_greedy_tokens(model, prompt, tokens))
        finished.append(time.perf_counter() - start)
    return {"outputs": outputs, "finished": finished, "errors": []}


def _threaded_requests(model, prompts: List[List[int]], tokens: int) -> Dict[str, Any]:
    """One thread per request, all on the one model, released together."""
    return requests_released_together(len(prompts), lambda index: _greedy_tokens(model, prompts[index], tokens))


def requests_released_together(n: int, request: Callable[[int], Any],
                               pool: Optional[ThreadPoolExecutor] = None) -> Dict[str, Any]:
    """`request(i)` on n threads at once (a barrier releases them); each one's result and finish time.

    New threads by default; with `pool` (n workers, kept across calls), the pool's threads, as a
    thread pool or `asyncio.to_thread` has them: their streams and per-thread state outlive a burst.
    """
    outputs: List[Any] = [None] * n
    finished = [0.0] * n
    errors: List[str] = []
    gate = threading.Barrier(n + 1)
    start = 0.0

    def serve(index: int) -> None:
        gate.wait()
        try:
            outputs[index] = request(index)
        except Exception as error:  # noqa: BLE001 - recorded: a failed request is no sample
            errors.append(repr(error)[:300])
        finished[index] = time.perf_counter() - start

    if pool is not None:  # each task holds its worker at the barrier, so the n tasks take n threads
        futures = [pool.submit(serve, i) for i in range(n)]
        start = time.perf_counter()
        gate.wait()
        for future in futures:
            future.result()
    else:
        threads = [threading.Thread(target=serve, args=(i,), name=f"request-{i}") for i in range(n)]
        for thread in threads:
            thread.start()
        start = time.perf_counter()
        gate.wait()
        for thread in threads:
            thread.join()
    return {"outputs": outputs, "finished": finished, "errors": errors}


def _next_responses(generator) -> tuple:
    """(prompt responses, generation responses) of one next(), whatever the release returns."""
    result = generator.next()
    return tuple(result) if isinstance(result, tuple) else ([], result)


def batched_requests(model, prompts: List[List[int]], tokens: int, tokenizer: Any = None) -> Dict[str, Any]:
    """One BatchGenerator holding every request, driven by this thread (built before the clock starts).

    With a `tokenizer`, each request's tokens also go through a streaming detokenizer of its own, as a
    server that batches turns each token into text.
    """
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=tokens)
    start = time.perf_counter()
    uids = generator.insert(prompts, max_tokens=[tokens] * len(prompts))
    got: Dict[int, List[int]] = {uid: [] for uid in uids}
    texts = {uid: tokenizer.detokenizer for uid in uids} if tokenizer is not None else {}
    done: Dict[int, float] = {}
    while True:
        prompt_responses, responses = _next_responses(generator)
        for response in responses:
            got[response.uid].append(int(response.token))
            if texts:
                texts[response.uid].add_token(int(response.token))
                _ = texts[response.uid].last_segment  # what a server sends on
            if response.finish_reason is not None:
                done[response.uid] = time.perf_counter() - start
        if not prompt_responses and not responses:
            break
    generator.close()
    return {"outputs": [got[uid] for uid in uids], "finished": [done.get(uid, float("nan")) for uid in uids],
            "errors": []}


_SHARED_MODES = {"serial": _serial_requests, "threads": _threaded_requests, "batch": batched_requests}


def _shared_model_tokens(smoke: bool, device: str) -> int:
    """Tokens per request in shared_model, and in batch_equality, whose batches it is compared with."""
    return 8 if smoke else (128 if device == "gpu" else 64)


def shared_model(path: str, smoke: bool, device: str) -> Dict[str, Any]:
    """N requests on one model: one at a time, N threads (the shim installed), or one BatchGenerator.

    One process, the shim installed for every mode (that is the application's choice
    being measured: thread or batch, not shim or none); rounds alternate the order of
    the modes (ABBA). Latency is from the burst's start (every request arrives at once)
    to the request's last token. Outputs are compared with the first serial round's.
    """
    ns = (1, 2) if smoke else (1, 2, 4, 8)
    tokens = _shared_model_tokens(smoke, device)
    rounds = 1 if smoke else 2
    model, _ = load_lm(path)
    prompts = [request_prompt(i) for i in range(max(ns))]
    batched_requests(model, prompts[:2], 2)  # warm-up: compile caches, allocator
    _threaded_requests(model, prompts[:2], 2)
    reference = _serial_requests(model, prompts, tokens)["outputs"]
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for round_index in range(rounds):
        order = list(_SHARED_MODES) if round_index % 2 == 0 else list(reversed(_SHARED_MODES))
        for n in ns:
            for mode in order:
                run = _SHARED_MODES[mode](model, prompts[:n], tokens)
                wall = max(run["finished"])
                equal = [got == want for got, want in zip(run["outputs"], reference)]
                runs.setdefault(f"{mode}/N={n}", []).append({
                    "tokens_per_s": n * tokens / wall, "latency_p50_ms": statistics.median(run["finished"]) * 1e3,
                    "latency_max_ms": wall * 1e3, "equal": sum(equal), "errors": run["errors"]})
    results: Dict[str, Any] = {"tokens": tokens, "rounds": rounds, "ns": list(ns)}
    for key, samples in runs.items():
        n = int(key.split("=")[1])
        results[key] = {
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in samples),
            "latency_p50_ms": statistics.median(s["latency_p50_ms"] for s in samples),
            "latency_max_ms": statistics.median(s["latency_max_ms"] for s in samples),
            "equal_to_serial": all(s["equal"] == n for s in samples),
            "requests_equal_to_serial": min(s["equal"] for s in samples),
            "errors": [e for s in samples for e in s["errors"]][:5],
            "samples_tokens_per_s": [s["tokens_per_s"] for s in samples]}
    return results


def batch_equality(path: str, smoke: bool, device: str) -> Dict[str, Any]:
    """How many of N requests one BatchGenerator, on one thread, answers as one at a time does.

    Run without the shim: a batch whose outputs differ from one-at-a-time in the
    shared_model section differs here as well when the cause is the batched arithmetic
    (padding, other kernel shapes in bfloat16), not the shim.
    """
    ns = (2,) if smoke else (4, 8)
    tokens = _shared_model_tokens(smoke, device)
    model, _ = load_lm(path)
    prompts = [request_prompt(i) for i in range(max(ns))]
    reference = _serial_requests(model, prompts, tokens)["outputs"]
    equal = {}
    for n in ns:
        outputs = batched_requests(model, prompts[:n], tokens)["outputs"]
        equal[f"N={n}"] = sum(got == want for got, want in zip(outputs, reference))
    return {"tokens": tokens, "equal_to_serial": equal}


# ------------------------------------------------------------------ a BatchGenerator handed to a Worker


def handover(path: str, smoke: bool) -> Dict[str, Any]:
    """µs per next() of a BatchGenerator driven on its building thread, and from another thread.

    Built on the main thread and first called from another thread, the generator moves
    to a dedicated Worker (the shim's owner patch): every next() hops there and back and
    its responses are evaluated on the worker (``hand_over``). One process, the two ways
    alternated (ABBA), each with a fresh generator; the first next() (prompt processing,
    and the move) is timed on its own and left out of the per-call figure.
    """
    from mlx_lm.generate import BatchGenerator

    import mlx_threadsafe.patches.common.batch_generator as owner_patch

    sequences = 4
    tokens, rounds = (8, 2) if smoke else (64, 8)
    model, _ = load_lm(path)
    prompts = [request_prompt(i) for i in range(sequences)]

    def drive(generator, box: Dict[str, Any]) -> None:
        times: List[float] = []
        outputs: Dict[int, List[int]] = {}
        while True:
            start = time.perf_counter()
            prompt_responses, responses = _next_responses(generator)
            times.append(time.perf_counter() - start)
            for response in responses:
                outputs.setdefault(response.uid, []).append(int(response.token))
            if not prompt_responses and not responses:
                break
        box.update(times=times, outputs=outputs)

    def one(way: str) -> Dict[str, Any]:
        generator = BatchGenerator(model, max_tokens=tokens)
        generator.insert(prompts, max_tokens=[tokens] * sequences)
        box: Dict[str, Any] = {}
        if way == "direct":
            drive(generator, box)
        else:
            driver = threading.Thread(target=drive, args=(generator, box), name="driver")
            driver.start()
            driver.join()
        owner = vars(generator).get(owner_patch.OWNER)
        box["on_worker"] = owner is not None and owner.worker is not None
        generator.close()
        return box

    one("direct"), one("worker")  # warm-up
    samples: Dict[str, List[Dict[str, Any]]] = {"direct": [], "worker": []}
    for round_index in range(rounds):
        for way in ("direct", "worker") if round_index % 2 == 0 else ("worker", "direct"):
            samples[way].append(one(way))
    results: Dict[str, Any] = {"sequences": sequences, "tokens": tokens, "rounds": rounds}
    for way, boxes in samples.items():
        per_call = [statistics.mean(b["times"][1:]) * 1e6 for b in boxes]
        results[way] = {"us_per_next": statistics.median(per_call), "samples_us_per_next": per_call,
                        "first_next_us": statistics.median(b["times"][0] * 1e6 for b in boxes),
                        "calls": len(boxes[0]["times"]), "on_worker": all(b["on_worker"] for b in boxes)}
    results["ratio"] = statistics.median(w / d for d, w in zip(results["direct"]["samples_us_per_next"],
                                                                results["worker"]["samples_us_per_next"]))
    results["outputs_equal"] = all(b["outputs"] == samples["direct"][0]["outputs"]
                                   for boxes in samples.values() for b in boxes)
    return results


# ------------------------------------------------------------------ memory kept per ended thread


def rss_kb() -> tuple:
    """(resident set size in KB, where it was read): /proc/self/statm, psutil, else the peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024, "statm"
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1024, "psutil"
    except ImportError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 1024 if sys.platform == "darwin" else float(peak)), "ru_maxrss (peak)"


def _os_thread_gone(native_id: int, timeout: float = 1.0) -> None:
    """Wait until the OS thread has exited (its thread-local destructors run after join())."""
    task = f"/proc/self/task/{native_id}"
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.0005)


def thread_churn(path: str, smoke: bool, own_model: bool) -> Dict[str, Any]:
    """RSS growth and time per short-lived thread: warm up, read RSS, run threads one after another, read again.

    Three kinds of thread, each started, joined and gone before the next: one that never
    touches MLX (what a server's connection threads cost under the shim, which watches
    every thread from its start); one that evaluates a small array; one that runs
    ``mlx_lm.generate`` (4 tokens) on the process's model, or on a model it loads itself
    (`own_model`, or when a warm-up thread fails on the shared one: that side then records
    why). A thread that raises is counted as an error, not a sample.
    """
    import gc

    import mlx.core as mx
    from mlx_lm import generate

    warm, count = (20, 10) if smoke else (20, 200)
    model, tokenizer = load_lm(path)
    _decode(model, 4)
    mode = {"model": "loaded per thread" if own_model else "shared", "probe_error": None}

    def no_mlx() -> None:
        pass

    def evaluate() -> None:
        mx.eval(mx.ones((16, 16)) @ mx.ones((16, 16)))

    def run_generate() -> None:
        m, t = load_lm(path) if mode["model"] != "shared" else (model, tokenizer)
        generate(m, t, prompt=PROMPT, max_tokens=4)

    def run(body, threads: int, errors: List[str]) -> float:
        """Seconds for `threads` threads, each started, joined and gone before the next."""
        def target() -> None:
            try:
                body()
            except Exception as error:  # noqa: BLE001 - recorded: a failed thread is no sample
                errors.append(repr(error)[:300])

        start = time.perf_counter()
        for index in range(threads):
            thread = threading.Thread(target=target, name=f"churn-{index}")
            thread.start()
            thread.join()
            if thread.native_id is not None:
                _os_thread_gone(thread.native_id)
        return time.perf_counter() - start

    def settled_rss() -> float:
        gc.collect()
        return rss_kb()[0]

    results: Dict[str, Any] = {"threads": count, "warm_up_threads": warm, "rss_source": rss_kb()[1]}
    for kind, body in (("no_mlx", no_mlx), ("eval", evaluate), ("generate", run_generate)):
        errors: List[str] = []
        run(body, warm, errors)
        if errors and kind == "generate" and mode["model"] == "shared":
            # this side cannot share the model across threads: each thread loads its own
            mode.update(model="loaded per thread", probe_error=errors[0])
            errors = []
            run(body, warm, errors)
        before = settled_rss()
        errors = []
        seconds = run(body, count, errors)
        after = settled_rss()
        results[kind] = {"kb_per_thread": (after - before) / count, "us_per_thread": seconds / count * 1e6,
                         "rss_before_kb": before, "rss_after_kb": after, "error_count": len(errors),
                         "errors": errors[:5]}
    results["generate"].update(mode)
    return results


def main(argv: List[str]) -> int:
    section = argv[0]
    flags = set(a for a in argv[1:] if a.startswith("--"))
    values = dict(zip(argv[1::1], argv[2::1]))
    shim, smoke = "--shim" in flags, "--smoke" in flags
    device = values.get("--device", "cpu")
    if section not in ("install", "startup_hook"):
        import mlx.core as mx

        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    if shim and section != "install":
        import mlx_threadsafe

        mlx_threadsafe.install()
    if section == "generation":
        result = generation(model_dir(values["--model"], device), smoke, device, tiny=values["--model"] == "tiny")
    elif section == "round_trip":
        result = round_trip(smoke, pinned="--pinned" in flags)
    elif section == "install":
        result = install_cost()
    elif section == "startup_hook":
        result = startup_hook_cost()
    elif section == "materialize":
        result = materialize_cost(model_dir(values["--model"], device))
    elif section == "concurrency":
        result = concurrency(model_dir(values["--model"], device), shim, smoke, device)
    elif section == "shared_model":
        result = dict(shared_model(model_dir(values["--model"], device), smoke, device), model=values["--model"])
    elif section == "batch_equality":
        result = batch_equality(model_dir(values["--model"], device), smoke, device)
    elif section == "handover":
        result = dict(handover(model_dir(values["--model"], device), smoke), model=values["--model"])
    elif section == "batch_mode":  # issue 30: benchmarks/batch_mode.py
        from .batch_mode import batch_mode

        intervals = [float(v) for v in values["--hand-over"].split(",")] if "--hand-over" in values else []
        result = dict(batch_mode(model_dir(values["--model"], device), smoke, device, tiny=values["--model"] == "tiny",
                                 hand_over_intervals=intervals,
                                 only=values["--sides"].split(",") if "--sides" in values else ()),
                      model=values["--model"], measured_on=measured_on(device))
    elif section == "thread_churn":
        result = dict(thread_churn(model_dir(values["--model"], device), smoke, "--own-model" in flags),
                      shim=shim, model=values["--model"])
    elif section == "streams":
        from .streams import stream_rule_cost

        result = stream_rule_cost(smoke)
    else:
        raise SystemExit(f"unknown section {section!r}")
    if section in ("shared_model", "handover", "thread_churn", "streams"):
        result["measured_on"] = measured_on(device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
