"""What the stream rule costs: per ``with mx.stream(s)`` and per op, the rule off and on in one process.

The rule wraps ``mx.stream``, ``mx.set_default_stream`` and ``mx.synchronize``; no op is
wrapped, so an op's cost must not change (ratio 1). Blocks alternate ABBA: rule off, on,
on, off, with ``install(only=...)`` / ``uninstall()`` between them.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Dict, List


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def stream_rule_cost(smoke: bool) -> Dict[str, Any]:
    import mlx.core as mx

    import mlx_threadsafe

    calls, pairs = (2_000, 2) if smoke else (50_000, 16)
    device = mx.default_device()
    own = mx.new_stream(device)
    thread_local = mx.new_thread_local_stream(device)
    a, b = mx.ones(4), mx.ones(4)
    mx.eval(a, b)

    def enter(stream: Any) -> Callable[[], None]:
        def body() -> None:
            with mx.stream(stream):
                pass
        return body

    cases: Dict[str, Callable[[], Any]] = {
        "with mx.stream(own stream)": enter(own),
        "with mx.stream(ThreadLocalStream)": enter(thread_local),
        "op (a + b, not evaluated)": lambda: a + b,
        "op with stream=own stream": lambda: mx.add(a, b, stream=own),
    }
    samples: Dict[str, Dict[str, List[float]]] = {name: {"off": [], "on": []} for name in cases}
    foreign: Dict[str, List[float]] = {"on": []}
    made_elsewhere: Dict[str, Any] = {}
    maker = threading.Thread(target=lambda: made_elsewhere.update(stream=mx.new_stream(device)))
    maker.start()
    maker.join()
    for block in ["off", "on", "on", "off"] * pairs:
        if block == "on":
            mlx_threadsafe.install(only=["mlx.module_streams"])
        for name, fn in cases.items():
            samples[name][block].append(_per_call_us(fn, calls))
        if block == "on":
            # Only under the rule can a thread enter a stream another thread made (its twin).
            foreign["on"].append(_per_call_us(enter(made_elsewhere["stream"]), calls))
            mlx_threadsafe.uninstall()
    result: Dict[str, Any] = {"calls_per_sample": calls, "samples_per_side": 2 * pairs, "cases": {}}
    for name, sides in samples.items():
        off, on = statistics.median(sides["off"]), statistics.median(sides["on"])
        result["cases"][name] = {"off_us": off, "on_us": on, "ratio": on / off}
    result["cases"]["with mx.stream(another thread's stream)"] = {
        "off_us": None, "on_us": statistics.median(foreign["on"]), "ratio": None,
        "note": "raises at evaluation without the rule"}
    return result
