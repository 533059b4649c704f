"""Issue 29: the CUDA graph-capture abort under threads, as rates, and what the fix costs.

    python -m benchmarks.cuda_capture.run child  --model DIR [--shim] [--load-barrier] [--exit-barrier] [--warm-first]
    python -m benchmarks.cuda_capture.run cost   --out FILE   # single-thread ABBA + 8-thread throughput
    python -m benchmarks.cuda_capture.run rates  --out FILE --runs CONFIG=N ... [--parallel K] [--deadline S]

`child` is one fresh process: N=8 threads, each loads its own tiny random qwen3 model
(mlx_threadsafe.testing, built offline) with mlx_lm.load and generates 8 tokens greedily;
it prints one JSON line. `rates` runs such processes per configuration (interleaved, K at a
time) and counts exits by signal, the capture error in stderr, and failures. `cost` runs
fresh processes in the order U P P U ... (U: no shim, P: the shim with
MLX_THREADSAFE_CUDA_GRAPHS=off, the opt-in fix) measuring one thread's
tokens/s (generate_step, fixed token count) on the tiny and the wide model, then 8 threads
at once. Nothing is downloaded. Results are JSON; RESULTS.md says what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

THREADS = 8
TOKENS = 8
CAPTURE_ERROR = "cudaStreamEndCapture"

# name -> (shim?, extra environment, child flags)
CONFIGS: Dict[str, Any] = {
    "no_shim": (False, {}, []),
    "shim": (True, {}, []),  # the shim as installed by default
    "shim_gate": (True, {"MLX_THREADSAFE_CUDA_GATE": "on"}, []),  # as the gate's opt-in runs measured it
    "shim_no_gate": (True, {"MLX_THREADSAFE_DISABLE": "mlx.cuda_capture_gate"}, []),
    "shim_graphs_off": (True, {"MLX_THREADSAFE_CUDA_GRAPHS": "off"}, []),  # the opt-in fix
    # diagnostics
    "no_shim_graphs_off": (False, {"MLX_USE_CUDA_GRAPHS": "0"}, []),
    "no_shim_load_barrier": (False, {}, ["--load-barrier"]),
    "no_shim_exit_barrier": (False, {}, ["--exit-barrier"]),
    "no_shim_both_barriers": (False, {}, ["--load-barrier", "--exit-barrier"]),
    # The SIGFPE (RESULTS.md): if it is the race at a compiled kernel's first use, a generation on
    # the main thread before the 8 threads start (every kernel they need configured) removes it.
    "no_shim_warm_first": (False, {}, ["--warm-first"]),
    "shim_warm_first": (True, {}, ["--warm-first"]),
}

WIDE = dict(model_type="llama", num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5,
            rope_theta=10000.0, vocab_size=300, tie_word_embeddings=True, hidden_size=2048,
            num_hidden_layers=8, intermediate_size=5632)
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]


def _install_shim_first(shim: bool) -> None:
    # What MLX_THREADSAFE=1 does at start-up (the .pth hook is absent where the package is only
    # on PYTHONPATH): install() before mlx is imported.
    if shim:
        import mlx_threadsafe

        mlx_threadsafe.install()


# ------------------------------------------------------------------ child


def child(args) -> None:
    _install_shim_first(args.shim)
    from mlx_lm import generate, load

    from mlx_threadsafe.testing import PROMPT

    load_gate = threading.Barrier(THREADS)
    exit_gate = threading.Barrier(THREADS)
    texts: List[Any] = [None] * THREADS
    if args.warm_first:  # one thread runs every kernel once before the others start
        model, tokenizer = load(args.model)
        generate(model, tokenizer, PROMPT, max_tokens=TOKENS)
        del model, tokenizer

    def work(i: int) -> None:
        model, tokenizer = load(args.model)
        if args.load_barrier:
            load_gate.wait()
        texts[i] = generate(model, tokenizer, PROMPT, max_tokens=TOKENS)
        if args.exit_barrier:
            exit_gate.wait()

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,), name=f"gen-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = None
    if args.shim:
        import mlx_threadsafe

        rows = mlx_threadsafe.status()
        status = {name: f"{rows[name].state}: {rows[name].reason}"
                  for name in ("mlx.cuda_graph_capture", "mlx.cuda_capture_gate") if name in rows}
    print(json.dumps({"texts": texts, "seconds": time.perf_counter() - start,
                      "MLX_USE_CUDA_GRAPHS": os.environ.get("MLX_USE_CUDA_GRAPHS"), "patch": status}), flush=True)


# ------------------------------------------------------------------ rates


def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    dropped = ("MLX_USE_CUDA_GRAPHS", "MLX_THREADSAFE_CUDA_GRAPHS", "MLX_THREADSAFE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a native crash (SIGSEGV, SIGFPE, SIGABRT) prints the Python stacks
    return env


def rates(args) -> None:
    model = _model_dir("qwen3")
    plan: List[str] = []
    wanted = {}
    for spec in args.runs:
        name, n = spec.split("=")
        wanted[name] = int(n)
    # interleave the configurations so that each sees the same conditions over time
    while any(wanted.values()):
        for name in list(wanted):
            if wanted[name]:
                plan.append(name)
                wanted[name] -= 1
    deadline = time.monotonic() + args.deadline
    out = Path(args.out)
    results: Dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    records = results.setdefault("runs", [])
    running: List[Any] = []

    def reap(block: bool) -> None:
        for item in list(running):
            name, proc, started = item
            if block:
                proc.wait()
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout, stderr = proc.communicate()
            rc = proc.returncode
            last = None
            for line in stdout.splitlines():
                if line.startswith("{"):
                    last = json.loads(line)
            texts = last["texts"] if last else None
            records.append({
                "config": name, "rc": rc, "signal": -rc if rc < 0 else None,
                "capture_error": CAPTURE_ERROR in stderr,
                "ok": rc == 0 and last is not None,
                "threads_agree": bool(texts) and len(set(texts)) == 1,
                "text": texts[0] if texts else None,
                "patch": last.get("patch") if last else None,
                "graphs_var": last.get("MLX_USE_CUDA_GRAPHS") if last else None,
                "seconds": round(time.monotonic() - started, 2),
                "stderr_tail": stderr.strip().splitlines()[-4:] if rc != 0 else [],
                "fault": _fault_lines(stderr) if rc != 0 else [],
            })

    for name in plan:
        while len(running) >= args.parallel:
            reap(False)
            time.sleep(0.05)
        if time.monotonic() > deadline:
            break
        shim, extra, flags = CONFIGS[name]
        command = [sys.executable, "-m", "benchmarks.cuda_capture.run", "child", "--model", model, *flags]
        if shim:
            command.append("--shim")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_child_env(extra))
        running.append((name, proc, time.monotonic()))
        if len(records) % 10 == 0:
            _summarize(results)
            out.write_text(json.dumps(results, indent=1))
    while running:
        reap(True)
    results["parallel_processes"] = args.parallel
    results["device"] = device_info()
    _summarize(results)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))


def _fault_lines(stderr: str) -> List[str]:
    """faulthandler's report: the error line and the stack of the thread that crashed (its frames first)."""
    lines = stderr.splitlines()
    kept: List[str] = []
    for index, line in enumerate(lines):
        if line.startswith("Fatal Python error") or line.startswith("Current thread"):
            kept.append(line)
            if line.startswith("Current thread"):
                kept.extend(lines[index + 1:index + 13])
    return kept


def _summarize(results: Dict[str, Any]) -> None:
    summary: Dict[str, Any] = {}
    for r in results.get("runs", []):
        s = summary.setdefault(r["config"], {"runs": 0, "aborts": 0, "capture_aborts": 0, "signals": {},
                                             "capture_errors": 0, "other_abort_messages": {},
                                             "other_failures": 0, "ok": 0, "texts": {}})
        s["runs"] += 1
        if r["signal"]:
            s["aborts"] += 1
            s["signals"][str(r["signal"])] = s["signals"].get(str(r["signal"]), 0) + 1
            if r["capture_error"]:
                s["capture_aborts"] += 1
            else:
                message = (r["stderr_tail"] or ["(no stderr)"])[-1][:120]
                s["other_abort_messages"][message] = s["other_abort_messages"].get(message, 0) + 1
        elif not r["ok"] or not r["threads_agree"]:
            s["other_failures"] += 1
        s["capture_errors"] += int(r["capture_error"])
        s["ok"] += int(r["ok"] and r["threads_agree"])
        if r["text"] is not None:
            s["texts"][r["text"]] = s["texts"].get(r["text"], 0) + 1
    results["summary"] = summary


# ------------------------------------------------------------------ cost


def measure(args) -> None:
    """One process of the ABBA: tokens/s of one thread, then of 8 threads at once (tiny)."""
    _install_shim_first(args.shim)
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    def tokens_per_s(model, tokens: int) -> float:
        start = time.perf_counter()
        for (_, _), _ in zip(generate_step(mx.array(PROMPT_IDS), model, max_tokens=tokens), range(tokens)):
            pass
        return tokens / (time.perf_counter() - start)

    result: Dict[str, Any] = {"shim": args.shim, "MLX_USE_CUDA_GRAPHS": os.environ.get("MLX_USE_CUDA_GRAPHS")}
    for name, tokens, reps in (("tiny", 128, 7), ("wide", 128, 5)):
        model, _ = load(args.models[name])
        tokens_per_s(model, 16)  # warm-up: kernels, graph cache
        samples = [tokens_per_s(model, tokens) for _ in range(reps)]
        result[name] = {"tokens_per_s": statistics.median(samples), "samples": samples}
        print(json.dumps({"partial": result}), flush=True)
    models = [load(args.models["tiny"])[0] for _ in range(THREADS)]
    for m in models:
        tokens_per_s(m, 4)
    box: List[float] = []

    def one(m) -> None:
        box.append(tokens_per_s(m, 64))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    result["threads8_tiny"] = {"tokens_per_s": THREADS * 64 / wall, "wall_s": wall}
    print(json.dumps({"final": result}), flush=True)


def inprocess(args) -> None:
    """One process: generate_step tokens/s with the shim off and on, alternating (ABBA) on the same model.

    ``--toggle shim``: off is no shim at all; ``--toggle gate``: off is the shim without
    mlx.cuda_capture_gate, on the shim with it.
    """
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    import mlx_threadsafe

    def one(model, tokens: int) -> None:
        for (_, _), _ in zip(generate_step(mx.array(PROMPT_IDS), model, max_tokens=tokens), range(tokens)):
            pass

    pool = ThreadPoolExecutor(args.threads) if args.threads > 1 and args.pool else None

    def tokens_per_s(model, tokens: int) -> float:
        start = time.perf_counter()
        if args.threads == 1:
            one(model, tokens)
        elif pool is not None:  # threads that stay (a server's pool, asyncio.to_thread)
            list(pool.map(lambda _: one(model, tokens), range(args.threads)))
        else:  # a new thread per request: each one's first use and end take the gate exclusively
            threads = [threading.Thread(target=one, args=(model, tokens)) for _ in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return args.threads * tokens / (time.perf_counter() - start)

    def switch(on: bool) -> None:
        mlx_threadsafe.uninstall()
        if on:
            mlx_threadsafe.install()
        elif args.toggle == "gate":
            mlx_threadsafe.install(exclude=["mlx.cuda_capture_gate"])

    result: Dict[str, Any] = {"pairs": args.pairs, "tokens": args.tokens, "toggle": args.toggle,
                              "threads": args.threads, "pool": args.pool}
    for name in args.only:
        model, _ = load(args.models[name])
        tokens_per_s(model, 16)
        pairs = []
        for index in range(args.pairs):
            pair = {}
            for side in ("off", "on") if index % 2 == 0 else ("on", "off"):
                switch(side == "on")
                print(f"{name} pair {index} side {side}", file=sys.stderr, flush=True)  # names the side of a crash
                pair[side] = tokens_per_s(model, args.tokens)
            pairs.append(pair)
        mlx_threadsafe.uninstall()
        result[name] = {"off": statistics.median(p["off"] for p in pairs),
                        "on": statistics.median(p["on"] for p in pairs),
                        "ratio": statistics.median(p["on"] / p["off"] for p in pairs), "samples": pairs}
        print(json.dumps({name: {k: v for k, v in result[name].items() if k != "samples"}}), flush=True)
    result["device"] = device_info()
    Path(args.out).write_text(json.dumps(result, indent=1))


def cost(args) -> None:
    models = {"tiny": _model_dir("qwen3"), "wide": _wide_dir()}
    order = "UPPU" * args.pairs
    out = Path(args.out)
    results: Dict[str, Any] = {"order": order, "patched": args.patched, "processes": []}
    for side in order:
        command = [sys.executable, "-m", "benchmarks.cuda_capture.run", "measure",
                   "--tiny", models["tiny"], "--wide", models["wide"]] + (["--shim"] if side == "P" else [])
        extra = {"MLX_THREADSAFE_CUDA_GRAPHS": "off"} if side == "P" and args.patched == "graphs_off" else {}
        proc = subprocess.run(command, capture_output=True, text=True, env=_child_env(extra), timeout=300)
        record: Dict[str, Any] = {"side": side, "rc": proc.returncode}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                data = json.loads(line)
                record.update(data.get("final") or data.get("partial") or {})
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr.strip().splitlines()[-4:]
        results["processes"].append(record)
        out.write_text(json.dumps(results, indent=1))
    summary = {}
    for key in ("tiny", "wide", "threads8_tiny"):
        u = [p[key]["tokens_per_s"] for p in results["processes"] if p["side"] == "U" and key in p]
        p_ = [p[key]["tokens_per_s"] for p in results["processes"] if p["side"] == "P" and key in p]
        if u and p_:
            summary[key] = {"unpatched": statistics.median(u), "patched": statistics.median(p_),
                            "ratio": statistics.median(p_) / statistics.median(u), "n_unpatched": len(u),
                            "n_patched": len(p_)}
    results["summary"] = summary
    results["device"] = device_info()
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(summary, indent=1))


# ------------------------------------------------------------------ shared


def _model_dir(arch: str) -> str:
    from mlx_threadsafe.testing import build_lm

    return str(build_lm(arch))


def _wide_dir() -> str:
    from mlx_threadsafe.testing import build_lm_from_config

    return str(build_lm_from_config("cuda-capture-wide", WIDE, dtype="bfloat16"))


def device_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        info["nvidia_smi"] = smi
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        info["driver_cuda_version"] = found.group(1) if found else None
    except Exception as error:  # noqa: BLE001
        info["nvidia_smi"] = repr(error)
    try:
        from importlib.metadata import version

        info["packages"] = {d: version(d) for d in ("mlx", "mlx-cuda-13", "mlx-lm", "wrapt", "transformers",
                                                    "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13")}
    except Exception as error:  # noqa: BLE001
        info["packages"] = repr(error)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("child")
    c.add_argument("--model", required=True)
    c.add_argument("--shim", action="store_true")
    c.add_argument("--load-barrier", action="store_true")
    c.add_argument("--exit-barrier", action="store_true")
    c.add_argument("--warm-first", action="store_true", help="generate once on the main thread first")
    r = sub.add_parser("rates")
    r.add_argument("--out", required=True)
    r.add_argument("--runs", nargs="+", required=True)
    r.add_argument("--parallel", type=int, default=8)
    r.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new run starts")
    m = sub.add_parser("measure")
    m.add_argument("--tiny", required=True)
    m.add_argument("--wide", required=True)
    m.add_argument("--shim", action="store_true")
    i = sub.add_parser("inprocess")
    i.add_argument("--out", required=True)
    i.add_argument("--pairs", type=int, default=10)
    i.add_argument("--tokens", type=int, default=128)
    i.add_argument("--toggle", choices=("shim", "gate"), default="shim")
    i.add_argument("--threads", type=int, default=1, help="requests at once, each on its own thread")
    i.add_argument("--pool", action="store_true", help="the threads of one pool, kept between samples")
    i.add_argument("--only", nargs="+", choices=("wide", "tiny"), default=["wide", "tiny"])
    k = sub.add_parser("cost")
    k.add_argument("--out", required=True)
    k.add_argument("--pairs", type=int, default=2, help="UPPU blocks")
    k.add_argument("--patched", choices=("default", "graphs_off"), default="default",
                   help="P: the shim as installed by default, or with MLX_THREADSAFE_CUDA_GRAPHS=off")
    args = parser.parse_args(argv)
    if args.command == "measure":
        args.models = {"tiny": args.tiny, "wide": args.wide}
    if args.command == "inprocess":
        args.models = {"tiny": _model_dir("qwen3"), "wide": _wide_dir()}
    {"child": child, "rates": rates, "measure": measure, "cost": cost, "inprocess": inprocess}[args.command](args)


if __name__ == "__main__":
    main()
