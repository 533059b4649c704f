"""A soak of a real, unchanged model server: concurrent clients, then SIGINT.

Used by the server tests and the benchmarks (soak_server, abort_rates):

    python -m harness.soak --python PY --model DIR [--server mlx_lm.server] [--via none|run|env]

starts ``PY -m SERVER --model DIR`` on 127.0.0.1, sends ``clients`` concurrent requests
(chat and text completions, streaming and not) while ``hang_ups`` more clients start a
stream and disconnect after its first chunk, then sends SIGINT and waits for the exit. It counts what a
user would see: requests answered correctly, the exit code, and the known bad lines on
stderr. ``--via run`` starts the server under ``mlx-threadsafe run``; ``--via env`` sets
MLX_THREADSAFE=1 (the opt-in start-up hook).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

BAD_STDERR = ("There is no Stream", "terminate called", "Segmentation fault", "Fatal Python error")
# What a server logs for a client that hung up, and for the model-hub cache that a clean
# environment lacks (/v1/models): expected, not failures.
HARMLESS_ERRORS = ("BrokenPipeError", "ConnectionResetError", "CacheNotFound")


@dataclass
class SoakResult:
    requests: int
    answered: int
    hung_up: int
    retried_connections: int
    exit_code: Optional[int]
    bad_stderr: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.answered == self.requests and self.exit_code == 0 and not self.bad_stderr

    def summary(self) -> str:
        text = f"{self.answered}/{self.requests} answered, {self.hung_up} hung up, exit {self.exit_code}"
        if self.bad_stderr:
            text += f", stderr: {self.bad_stderr[0][:120]!r}"
        if self.failures:
            text += f", first failure: {self.failures[0][:160]}"
        return text


def free_port() -> int:
    # An ephemeral port, free now: a client connection made by a process running beside this
    # one may take it as its local port before the server binds it ("Address already in use").
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not listening on {port} after {timeout:.0f}s")


# mlx_vlm.server speaks chat only and requires the `model` field.
CHAT_ONLY_SERVERS = ("mlx_vlm.server",)


def _request_body(index: int, hang_up: bool, model: str, chat_only: bool) -> Dict[str, object]:
    body: Dict[str, object] = {"model": model, "max_tokens": 8, "temperature": 0.0,
                               "stream": hang_up or index % 2 == 1}
    if chat_only or index % 4 < 2:
        body["messages"] = [{"role": "user", "content": f"w{5 + index} w7 w9"}]
    else:
        body["prompt"] = f"w{5 + index} w7 w9"
    return body


def _post(port: int, path: str, body: Dict[str, object], timeout: float, retries: List[int]):
    """Send the request; retry a connection reset before any response, as HTTP clients do.

    The stock servers listen with a backlog of 5, so a burst of connections can be reset
    by the kernel before the server ever sees them; the retries are counted and reported.
    """
    for attempt in range(4):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            return connection, connection.getresponse()
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            connection.close()
            if attempt == 3:
                raise
            retries.append(1)
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _one_client(port: int, index: int, hang_up: bool, timeout: float, retries: List[int], model: str,
                chat_only: bool) -> str:
    """'answered', 'hung-up', or raises with what went wrong."""
    body = _request_body(index, hang_up, model, chat_only)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    connection, response = _post(port, path, body, timeout, retries)
    try:
        if response.status != 200:
            raise RuntimeError(f"{path} -> HTTP {response.status}: {response.read()[:200]!r}")
        if not body["stream"]:
            choice = json.loads(response.read())["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            if not isinstance(text, str):
                raise RuntimeError(f"{path}: no text in {choice!r}")
            return "answered"
        if hang_up:
            response.readline()  # the first chunk, then hang up mid-stream
            return "hung-up"
        lines = response.read().decode("utf-8", "replace").splitlines()
        if "data: [DONE]" not in lines:
            raise RuntimeError(f"{path} stream ended without [DONE]: {lines[-3:]!r}")
        return "answered"
    finally:
        connection.close()


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b")


def _bad_stderr_lines(lines: List[str]) -> List[str]:
    """Known crash marks and exception lines that a hang-up does not explain.

    Handler threads print their tracebacks interleaved, so lines are judged one by one.
    """
    return [line for line in lines
            if any(mark in line for mark in BAD_STDERR)
            or (_EXCEPTION_LINE.match(line) and not any(mark in line for mark in HARMLESS_ERRORS))]


def soak(python: str, model: str, server: str = "mlx_lm.server", via: str = "none", clients: int = 16,
         hang_ups: int = 4, startup_timeout: float = 120.0, request_timeout: float = 120.0,
         port: Optional[int] = None) -> SoakResult:
    """`port`: the server's; a free one by default (fine for one soak at a time, see free_port)."""
    port = port or free_port()
    # faulthandler: a server that does not exit after SIGINT gets SIGABRT, and its stderr then
    # shows where every thread was stuck.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")
    env.pop("MLX_THREADSAFE", None)
    command = [python, "-m", server, "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if via == "run":
        command = [python, "-m", "mlx_threadsafe", "run", "--"] + command
    elif via == "env":
        env["MLX_THREADSAFE"] = "1"
    elif via != "none":
        raise ValueError(f"via must be none, run or env, not {via!r}")
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        outcomes: List[str] = []
        retries: List[int] = []
        try:
            wait_listening(port, process, startup_timeout)

            def client(index: int, hang_up: bool) -> None:
                try:
                    outcomes.append(_one_client(port, index, hang_up, request_timeout, retries, model,
                                                server in CHAT_ONLY_SERVERS))
                except Exception as error:  # noqa: BLE001 - counted, reported
                    outcomes.append(f"{type(error).__name__}: {error}")

            threads = [threading.Thread(target=client, args=(i, i >= clients)) for i in range(clients + hang_ups)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(0.5)  # let the server notice the hang-ups before it is stopped
        except RuntimeError as error:
            outcomes.append(f"server: {error}")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                exit_code: Optional[int] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                exit_code = None
                process.send_signal(signal.SIGABRT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        stderr.seek(0)
        lines = stderr.read().decode("utf-8", "replace").splitlines()
    bad = _bad_stderr_lines(lines)
    hung_up = outcomes.count("hung-up")
    return SoakResult(requests=clients, answered=outcomes.count("answered"), hung_up=hung_up,
                      retried_connections=len(retries),
                      exit_code=exit_code, bad_stderr=bad,
                      failures=[o for o in outcomes if o not in ("answered", "hung-up")],
                      stderr_tail="\n".join(lines[-(40 if exit_code is not None else 200):]))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--model", required=True)
    parser.add_argument("--server", default="mlx_lm.server")
    parser.add_argument("--via", default="none", choices=["none", "run", "env"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hang-ups", type=int, default=4)
    args = parser.parse_args(argv)
    result = soak(args.python, args.model, args.server, args.via, args.clients, args.hang_ups)
    print(json.dumps(dict(asdict(result), ok=result.ok, summary=result.summary())))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
