"""Cross-thread scenarios on real MLX and tiny offline models, each run in a fresh process.

Used by ``mlx-threadsafe doctor``, by the tests and by the compat-matrix harness:

    python -m mlx_threadsafe.scenarios NAME [--shim]

prints one JSON line: {"scenario": NAME, "ok": bool, "detail": str}. A scenario
returns a short detail on success and raises on failure; a crash of the process
(segfault, abort) is reported by the parent from the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

SCENARIOS: Dict[str, Callable[[], str]] = {}
DESCRIPTIONS: Dict[str, str] = {}


def scenario(description: str):
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        SCENARIOS[fn.__name__] = fn
        DESCRIPTIONS[fn.__name__] = description
        return fn

    return register


def on_new_thread(fn: Callable, *args, **kwargs):
    """Run `fn` on a fresh thread and return its result, re-raising its exception here."""
    box: Dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = error

    thread = threading.Thread(target=run, name=f"on-new-thread-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def _load(arch: str, **kwargs):
    from mlx_lm import load

    from .testing import build_lm

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
    from mlx_lm.sample_utils import make_sampler

    from .testing import PROMPT

    model, tokenizer = _load("llama")
    sampler = make_sampler(temp=1.0)
    outputs = [on_new_thread(generate, model, tokenizer, PROMPT, max_tokens=12, sampler=sampler) for _ in range(2)]
    if outputs[0] == outputs[1]:
        raise AssertionError(f"both threads drew the same text: {outputs[0]!r}")
    return "different"


# ------------------------------------------------------------------ running


@dataclass(frozen=True)
class Outcome:
    scenario: str
    ok: bool
    detail: str


def run_in_subprocess(name: str, shim: bool, python: Optional[str] = None, timeout: float = 300,
                      env: Optional[Dict[str, str]] = None) -> Outcome:
    command = [python or sys.executable, "-m", "mlx_threadsafe.scenarios", name] + (["--shim"] if shim else [])
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return Outcome(name, False, f"hung for {timeout}s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            if done.returncode != 0 and result["ok"]:
                return Outcome(name, False, f"passed, then the process exited with {done.returncode}")
            return Outcome(name, result["ok"], result["detail"])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return Outcome(name, False, f"process died (exit {done.returncode}): {tail}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shim = "--shim" in argv
    names = [a for a in argv if not a.startswith("--")]
    if len(names) != 1 or names[0] not in SCENARIOS:
        print(f"usage: python -m mlx_threadsafe.scenarios {{{','.join(SCENARIOS)}}} [--shim]", file=sys.stderr)
        return 2
    if shim:
        import mlx_threadsafe

        mlx_threadsafe.install()
    try:
        detail, ok = SCENARIOS[names[0]](), True
    except Exception as error:  # noqa: BLE001 - the outcome is the report
        detail, ok = f"{type(error).__name__}: {error}", False
    print(json.dumps({"scenario": names[0], "ok": ok, "detail": str(detail)[:300]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
