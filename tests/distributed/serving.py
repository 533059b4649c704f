"""Scenario (d): `mlx_lm.server` on a ring of ranks, 4 concurrent chat completions, then SIGINT.

What mlx-lm 0.32.2's server does when `mx.distributed.init().size() > 1`:
`run()` builds one `ResponseGenerator` per rank, whose `__init__` starts the generation
thread (`Thread(target=self._run_generate)`): it loads the model there (`sharded_load`,
tensor parallel, or pipeline with `--pipeline`) and loops on `_next_request`, which on
*every* iteration (0.1 s timeout) shares rank 0's next request with the other ranks through
`mx.distributed.all_sum` (`_share_object`: a size, then the pickled bytes), and the
`TimeBudget` syncs with `all_sum` too. Only rank 0 runs the HTTP server (`_run_http_server`,
where SIGINT -> `httpd.shutdown(); response_generator.stop_and_join()`); every other rank
blocks in `response_generator.join()` on its main thread.

Measured on a ring of 2 (mlx 0.32.4 CPU): SIGINT to rank 0 alone stops both ranks cleanly
(rank 0: `stop_and_join`; rank 1's generation thread gets `RuntimeError: [ring] connection
to a peer was lost` from `all_sum(0).item()` in `_share_object`, `_run_generate` logs it, the
thread ends, `join()` returns, exit 0, 0.4 s). SIGINT to rank 1 alone: rank 1 aborts (-6)
and mlx.launch SIGTERMs rank 0. SIGINT to the group (Ctrl-C): see test_distributed.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Sequence

from . import launch as ring_launch

PROMPTS = ["w5 w7 w9", "w6 w7 w9", "w7 w7 w9", "w8 w7 w9"]


def wait_listening(port: int, alive, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server ended before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {timeout:.0f}s")


def chat(port: int, prompt: str, timeout: float, max_tokens: int = 8) -> str:
    body = {"model": "default_model", "max_tokens": max_tokens, "temperature": 0.0, "stream": False,
            "messages": [{"role": "user", "content": prompt}]}
    for attempt in range(4):  # the stock server listens with a backlog of 5: retry a reset connection
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            if attempt == 3:
                raise
            time.sleep(0.2 * (attempt + 1))
        finally:
            connection.close()
    raise AssertionError("unreachable")


def concurrent_chats(port: int, prompts: Sequence[str] = PROMPTS, timeout: float = 60.0) -> List[str]:
    """One thread per prompt, all at once; each answer, or 'ERROR: ...'."""
    answers: Dict[int, str] = {}

    def client(i: int) -> None:
        try:
            answers[i] = chat(port, prompts[i], timeout)
        except Exception as error:  # noqa: BLE001 - reported
            answers[i] = f"ERROR: {type(error).__name__}: {error}"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return [answers.get(i, "ERROR: no answer") for i in range(len(prompts))]


def server_argv(model: str, port: int) -> List[str]:
    return [sys.executable, "-m", "mlx_lm.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]


def reference_answers(model: str, prompts: Sequence[str] = PROMPTS, startup_timeout: float = 120.0) -> List[str]:
    """The answers of a one-process `mlx_lm.server` (no launcher, no shim) to the same requests."""
    with ring_launch.port_block() as ports:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("MLX_THREADSAFE", None)
        with tempfile.TemporaryFile() as err:
            process = subprocess.Popen(server_argv(model, ports[0]), stdout=subprocess.DEVNULL, stderr=err,
                                       env=env, start_new_session=True)
            try:
                wait_listening(ports[0], lambda: process.poll() is None, startup_timeout)
                answers = concurrent_chats(ports[0], prompts)
            finally:
                try:
                    os.killpg(process.pid, signal.SIGINT)
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait(timeout=30)
    return answers


def serve_on_ring(model: str, shim: str = "off", n: int = 2, prompts: Sequence[str] = PROMPTS,
                  startup_timeout: float = 120.0, stop_timeout: float = 30.0) -> dict:
    """Start the server on N ranks, send the prompts at once, SIGINT the launcher's group.

    `shim`: "off"; "env" (MLX_THREADSAFE=1 for the launcher, inherited by every rank);
    "run" (`mlx-threadsafe run --` in front of each rank's python); "run-launcher"
    (`mlx-threadsafe run --` in front of mlx.launch). Returns answers, the ranks' results,
    how long the launcher took to return after SIGINT, and whether it had to be killed.
    """
    env = {"MLX_THREADSAFE": "1"} if shim == "env" else {}
    runner = [sys.executable, "-m", "mlx_threadsafe", "run", "--"]
    rank_prefix = runner if shim == "run" else []
    launcher_prefix = runner if shim == "run-launcher" else []
    out: dict = {"answers": None, "error": None, "stop_seconds": None, "killed_after_sigint": False}
    with ring_launch.port_block() as ports:
        http_port = ports[-1]  # ring ranks: ports[0:n]
        with ring_launch.start(server_argv(model, http_port), n=n, env=env, launcher_prefix=launcher_prefix,
                               rank_prefix=rank_prefix, ports=ports) as ring:
            try:
                wait_listening(http_port, lambda: ring.proc.poll() is None, startup_timeout)
                out["answers"] = concurrent_chats(http_port, prompts)
                time.sleep(0.5)
            except RuntimeError as error:
                out["error"] = str(error)
            sigint_at = time.monotonic()
            ring.signal_group(signal.SIGINT)  # what a Ctrl-C in the launcher's terminal does
            try:
                ring.proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                out["killed_after_sigint"] = True
                ring.signal_group(signal.SIGKILL)
                ring.proc.wait(timeout=30)
            out["stop_seconds"] = round(time.monotonic() - sigint_at, 2)
            time.sleep(0.1)
            out["ranks"] = ring.results()
    return out


if __name__ == "__main__":  # python -m distributed.serving MODEL [off|env|run|run-launcher] (from tests/)
    from mlx_threadsafe.testing import build_lm

    path = sys.argv[1] if len(sys.argv) > 1 and os.path.isdir(sys.argv[1]) else str(build_lm("llama"))
    mode = sys.argv[-1] if sys.argv[-1] in ("off", "env", "run", "run-launcher") else "off"
    if "--reference" in sys.argv:
        print("reference", reference_answers(path))
    result = serve_on_ring(path, mode)
    print("answers", result["answers"], "error", result["error"], "stop", result["stop_seconds"],
          "killed", result["killed_after_sigint"])
    print(result["ranks"].report())
    for rank in result["ranks"]:
        print(f"--- rank {rank.rank} stderr tail\n" + "\n".join(rank.stderr.splitlines()[-15:]))
