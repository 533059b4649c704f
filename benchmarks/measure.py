"""One measurement per call, in a fresh process so patched and unpatched runs never mix:

    python -m benchmarks.measure SECTION --model NAME [--shim] [--device cpu|gpu] [--smoke]

prints one JSON line. The driver (`python -m benchmarks`) interleaves the patched and
unpatched processes and turns their numbers into ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

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


def _load(path: str):
    from mlx_lm import load

    return load(path)


def _decode(model, tokens: int) -> None:
    """Exactly `tokens` greedy steps (no early stop at EOS: random models hit it at random)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    for (_, _), _ in zip(generate_step(mx.array(PROMPT), model, max_tokens=tokens), range(tokens)):
        pass


def generation(path: str, smoke: bool, device: str) -> Dict[str, Any]:
    """Single-thread decode speed, unpatched and patched in turn within one process.

    install() and uninstall() between repetitions switch the shim on and off exactly
    (the originals come back), so both sides share one model, one device context and
    the same drift of the machine; the ratio is the median of the paired repetitions.
    """
    import mlx_threadsafe

    model, _ = _load(path)
    tokens, rounds = (16, 2) if smoke else (256 if device == "gpu" else 128, 16)
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


def install_cost() -> Dict[str, Any]:
    """Import and install() times, and the modules they add to an mlx-lm application."""
    import subprocess

    start = time.perf_counter()
    import mlx_threadsafe

    imported = time.perf_counter()
    mlx_threadsafe.install()
    installed = time.perf_counter()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "mlx_vlm", "transformers"))
    # What the shim adds to a process that already imported mlx_lm (the application it serves).
    code = ("import sys, json, mlx_lm; before = set(sys.modules); import mlx_threadsafe; mlx_threadsafe.install(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    added = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    return {"import_ms": (imported - start) * 1e3, "install_ms": (installed - imported) * 1e3,
            "imported_heavy": heavy, "added_to_mlx_lm_app": added}


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
    starts = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        starts.append(time.perf_counter() - start)
    interpreter_start_s = statistics.median(starts)
    return {"hook_line_us": per_line_s * 1e6, "interpreter_start_ms": interpreter_start_s * 1e3,
            "share_of_start": per_line_s / interpreter_start_s, **_startup_with_the_variable()}


def _startup_with_the_variable(pairs: int = 15) -> Dict[str, Any]:
    """Whole `python -c pass` processes, MLX_THREADSAFE=1 and unset, in ABBA order."""
    import subprocess

    def start(variable: bool) -> float:
        env = dict(os.environ, MLX_THREADSAFE="1") if variable else {
            k: v for k, v in os.environ.items() if k != "MLX_THREADSAFE"}
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
        return time.perf_counter() - began

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
        model, _ = _load(path)
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
        models = [w.call(lambda: _load(path)[0]) for w in workers]  # each model loaded on its owner
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
        models = [_load(path)[0] for _ in range(k)]
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
        result = generation(model_dir(values["--model"], device), smoke, device)
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
    else:
        raise SystemExit(f"unknown section {section!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
