"""A long soak of a real mlx_lm.server with memory over time (issue 29 part 4; not CI).

    python -m benchmarks.soak_server --requests 10000 [--concurrency 8] [--via env|run|none] [--out FILE]

Builds a tiny random-weight model offline (mlx_threadsafe.testing.build_lm), starts
``python -m mlx_lm.server`` on 127.0.0.1 on a free port (``--via env``: MLX_THREADSAFE=1, the
start-up hook; ``--via run``: ``mlx-threadsafe run --``; ``--via none``: no shim) in a process
group of its own, and drives it from ``--concurrency`` client threads with a mix of
non-streaming and streaming chat and text completions (max_tokens 8, temperature 0) and
hang-ups (a stream dropped after its first chunk). A connection reset before any response
(the stock server listens with a backlog of 5) is retried up to 3 times and counted apart.
Every non-streaming answer must equal the one-request-at-a-time reference taken at start for
its prompt and endpoint; a difference is an error ("mismatch").

Every ``--every`` requests it samples the server's RSS (VmRSS of /proc/PID/status) and prints
a line. MLX active memory lives in the server process, which this does not change, so it is
not recorded. At the end: totals, the RSS slope (KiB per 1,000 requests, least squares over
the samples after the first 1,000 requests), then SIGINT and the exit (code, ``terminate
called`` on stderr, seconds). Writes benchmarks/results/soak-server.json by default.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from harness.evidence import machine, today, write_json
from harness.soak import free_port, wait_listening

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "soak-server.json")
PROMPTS = ["w5 w7 w9", "w11 w13 w2", "w20 w4 w8 w16", "w3 w3 w3", "w40 w1", "w9 w8 w7 w6 w5"]


_MODEL = [""]  # the model directory: mlx_lm.server matches "model" against it


def _rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _kind(index: int) -> Tuple[str, bool, bool]:
    """(endpoint, stream, hang_up) of request `index`: 4 of 10 plain, 5 streamed, 1 hang-up."""
    slot = index % 10
    endpoint = "chat" if (index // 10 + slot) % 2 == 0 else "text"
    return endpoint, slot >= 4, slot == 9


def _body(endpoint: str, prompt: str, stream: bool) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": _MODEL[0], "max_tokens": 8, "temperature": 0.0, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.retries = 0
        self.errors: Dict[str, int] = collections.Counter()
        self.first_errors: List[str] = []
        self.outcomes: Dict[str, int] = collections.Counter()

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.first_errors) < 10:
                self.first_errors.append(f"{kind}: {detail[:200]}")


def _post(port: int, path: str, body: Dict[str, Any], counters: Counters, timeout: float):
    for attempt in range(4):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            return connection, connection.getresponse()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            connection.close()
            if attempt == 3:
                raise
            with counters.lock:
                counters.retries += 1
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _answer_text(endpoint: str, payload: bytes) -> str:
    choice = json.loads(payload)["choices"][0]
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


def _request(port: int, index: int, reference: Dict[Tuple[str, str], str], counters: Counters,
             timeout: float) -> None:
    endpoint, stream, hang_up = _kind(index)
    prompt = PROMPTS[index % len(PROMPTS)]
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    try:
        connection, response = _post(port, path, _body(endpoint, prompt, stream), counters, timeout)
    except Exception as error:  # noqa: BLE001 - counted
        counters.error(f"connect:{type(error).__name__}", str(error))
        return
    try:
        if response.status != 200:
            counters.error(f"http{response.status}", repr(response.read()[:200]))
            return
        if hang_up:
            response.readline()
            outcome = "hung-up"
        elif stream:
            lines = response.read().decode("utf-8", "replace").splitlines()
            if "data: [DONE]" not in lines:
                counters.error("stream-no-done", repr(lines[-3:]))
                return
            outcome = "streamed"
        else:
            text = _answer_text(endpoint, response.read())
            expected = reference[(endpoint, prompt)]
            if text != expected:
                counters.error("mismatch", f"{endpoint} {prompt!r}: {text!r} != {expected!r}")
                return
            outcome = "answered"
        with counters.lock:
            counters.outcomes[outcome] += 1
    except Exception as error:  # noqa: BLE001 - counted
        counters.error(f"read:{type(error).__name__}", str(error))
    finally:
        connection.close()
        with counters.lock:
            counters.done += 1


def _slope_per_1000(samples: List[Dict[str, Any]]) -> Optional[float]:
    points = [(s["requests"], s["rss_kib"]) for s in samples if s["requests"] > 1000 and s["rss_kib"]]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if not sxx:
        return None
    return round(1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx, 1)


def soak(requests: int, concurrency: int, via: str, every: int, timeout: float = 60.0) -> Dict[str, Any]:
    from mlx_threadsafe.testing import build_lm

    model = str(build_lm("qwen3"))
    _MODEL[0] = model
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")
    env.pop("MLX_THREADSAFE", None)
    command = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port)]
    if via == "run":
        command = [sys.executable, "-m", "mlx_threadsafe", "run", "--"] + command  # execs: same pid
    elif via == "env":
        env["MLX_THREADSAFE"] = "1"
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                               start_new_session=True)
    counters = Counters()
    samples: List[Dict[str, Any]] = []
    exit_info: Dict[str, Any] = {}
    try:
        wait_listening(port, process, 120)
        reference: Dict[Tuple[str, str], str] = {}
        for endpoint in ("chat", "text"):
            for prompt in PROMPTS:
                path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
                connection, response = _post(port, path, _body(endpoint, prompt, False), counters, timeout)
                reference[(endpoint, prompt)] = _answer_text(endpoint, response.read())
                connection.close()
        start = time.monotonic()
        samples.append({"requests": 0, "seconds": 0.0, "rss_kib": _rss_kib(process.pid), "errors": 0,
                        "retries": counters.retries})
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for first in range(0, requests, every):
                batch = range(first, min(first + every, requests))
                list(pool.map(lambda i: _request(port, i, reference, counters, timeout), batch))
                elapsed = time.monotonic() - start
                sample = {"requests": counters.done, "seconds": round(elapsed, 2),
                          "rss_kib": _rss_kib(process.pid), "errors": sum(counters.errors.values()),
                          "errors_by_kind": dict(counters.errors), "retries": counters.retries,
                          "requests_per_s": round(counters.done / elapsed, 1)}
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                if process.poll() is not None:
                    counters.error("server-exited", f"code {process.returncode}")
                    break
        elapsed = time.monotonic() - start
        time.sleep(0.5)
        rss_before_sigint = _rss_kib(process.pid)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            code: Optional[int] = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        exit_info = {"code": code, "seconds": round(time.monotonic() - sent, 2)}
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        stderr.seek(0)
        lines = stderr.read().decode("utf-8", "replace").splitlines()
        stderr.close()
    exit_info["terminate_called"] = any("terminate called" in line for line in lines)
    exit_info["stderr_tail"] = lines[-8:]
    return {
        "date": today(), "machine": machine(), "via": via, "requests": requests, "concurrency": concurrency,
        "mix": "per 10: 4 non-streaming, 5 streaming, 1 hang-up after the first chunk; chat and text "
               "alternating; max_tokens 8, temperature 0; model build_lm('qwen3')",
        "done": counters.done, "outcomes": dict(counters.outcomes), "errors": sum(counters.errors.values()),
        "errors_by_kind": dict(counters.errors), "first_errors": counters.first_errors,
        "connection_retries": counters.retries, "seconds": round(elapsed, 1),
        "requests_per_s": round(counters.done / elapsed, 1) if elapsed else None,
        "rss_kib_start": samples[0]["rss_kib"], "rss_kib_end": rss_before_sigint,
        "rss_slope_kib_per_1000": _slope_per_1000(samples),
        "mlx_active_memory": "not recorded: it lives in the unchanged server process",
        "exit_after_sigint": exit_info, "samples": samples,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--via", default="env", choices=["env", "run", "none"])
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    result = soak(args.requests, args.concurrency, args.via, args.every)
    summary = {k: v for k, v in result.items() if k not in ("samples", "machine")}
    print(json.dumps(summary, indent=1))
    if args.out != "-":
        data = {}
        if os.path.exists(args.out):
            with open(args.out) as source:
                data = json.load(source)
        data[f"via_{args.via}"] = result
        write_json(args.out, data)
    return 0 if result["errors"] == 0 and result["exit_after_sigint"].get("code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
