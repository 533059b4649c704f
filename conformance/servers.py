"""Third-party OpenAI-compatible servers on a tiny offline model, without and with the shim.

Each check starts the server (one side: `none` = no shim, `run` = under
`mlx-threadsafe run --`, `env` = `MLX_THREADSAFE=1`, `batch` = `MLX_THREADSAFE=1
MLX_THREADSAFE_BATCH=1`, the opt-in batch mode, where a server lists it in `sides` or
--sides asks), waits for it (bounded), then:

1. sends 9 chat completions at once (streaming and not, temperature 0);
2. sends the same 9 prompts again one at a time, to the same server instance: that is
   the reference each concurrent answer must equal. Why not mlx-lm's own `generate()`?
   A server applies its own chat template, stop rules, token limits and detokenizer,
   so its serial answer can differ from mlx-lm's for reasons that have nothing to do
   with threads; the same instance answering serially differs from its concurrent
   answers only by the concurrency the shim is about. (The serial pass runs second so
   that the concurrent burst meets a cold prompt cache, the path that batches prefills;
   the serial answers may then come from the cache, which must not change them either.)
3. sends one ~40-token conversation twice and reads the prompt tokens the server reused
   on the second send: `usage.prompt_tokens_details.cached_tokens` where the server
   reports it (mlx-openai-server), else the growth of `/v1/cache/stats` counters
   (vllm-mlx: `tokens_saved`, `hits`); for a server without a prompt cache
   (`prompt_cache=False`) the step does not apply, which the record says (`cache_check`);
3b. where the server has `throughput`: the throughput probe (`measure_throughput`), its
   prompts one at a time, then bursts of 8 requests at once whose completion tokens/s
   are recorded (never judged; each answer must still equal its serial one);
4. stops the server (SIGINT, then SIGKILL of its process group) and scans its output for
   `There is no Stream`, `terminate called`, tracebacks and the servers' own
   "... failed" warnings;
5. with the shim: compares the server's output with that of the side without it, each
   line normalised (NORMALISE), and fails on any line only the shimmed output has (the
   shim's own debug log goes to a file of its own, MLX_THREADSAFE_LOG_FILE).

Every request has a timeout, and the process group is killed whatever happens.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from harness.evidence import today

from . import venvs

APPS_TO_THREAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps", "to_thread_app.py")
PORTS = range(18700, 18800)
CONCURRENT = 9
MAX_TOKENS = 12
READY_TIMEOUT = 300.0
REQUEST_TIMEOUT = 120.0
SIDES = ("none", "run", "env", "batch")
DEFAULT_SIDES = ("none", "run", "env")  # `batch` runs where a server lists it (Server.sides) or --sides asks
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SHIM_APPLIED = re.compile(r"^mlx_threadsafe: applied (\S+)")
LOG_REUSED = re.compile(r"cache HIT.*reusing (\d+) tokens")
LOGS = os.path.join(venvs.CONFORMANCE_VENVS, "logs")
MODELS = ("llama", "llama3rope")  # mlx_threadsafe.testing.LM_ARCHS; llama3rope keeps a lazy rope `_freqs`

BAD_MARKS = ("There is no Stream", "terminate called", "Traceback (most recent call last)",
             "Segmentation fault", "Fatal Python error", "insert_cache failed", "core dumped")


@dataclass
class Server:
    name: str
    version: str
    requirements: List[str]
    overrides: List[str]
    cpu_torch: bool
    command: Callable[[str, str, int], List[str]]  # (venv bin dir, model dir, port) -> argv
    modes: Dict[str, List[str]]
    note: str = ""
    conversation_words: int = 40
    # Modes that serve one request at a time by design and answer the others HTTP 503
    # "busy, retry later": the check retries those (bounded) and streams nothing there,
    # as the busy signal reaches a stream only as an opaque error frame.
    serialized_modes: Tuple[str, ...] = ()
    stream_conversation_modes: Tuple[str, ...] = ()  # modes whose prompt cache only streaming requests use
    packages: List[str] = field(default_factory=lambda: ["mlx", "mlx-lm", "mlx-vlm", "transformers", "torch"])
    # False: the server keeps no prompt cache, so step 3 (the conversation sent twice) does not
    # apply; the record says so (`cache_check`) and the side passes without a reused prefix.
    prompt_cache: bool = True
    # True: each side also measures throughput (THROUGHPUT_* below), recorded, never judged.
    throughput: bool = False
    sides: Tuple[str, ...] = DEFAULT_SIDES  # the sides a run without --sides checks

    @property
    def venv(self) -> str:
        return f"{self.name}-{self.version}"


SERVERS: Dict[str, Server] = {
    "mlx-openai-server": Server(
        name="mlx-openai-server", version="1.8.1",
        requirements=["mlx-openai-server==1.8.1"],
        # mflux's Linux wheels pin mlx < 0.32; torchvision serves only image models.
        overrides=["mflux" + venvs.NEVER, "torchvision" + venvs.NEVER],
        cpu_torch=True,  # outlines-core imports torch at import time, also for --model-type lm
        command=lambda bin_dir, model, port: [os.path.join(bin_dir, "mlx-openai-server"), "launch",
                                              "--model-path", model, "--model-type", "lm",
                                              "--host", "127.0.0.1", "--port", str(port)],
        modes={"default": []},
        note="mflux and torchvision left out (uv override); torch: the local CPU wheel when there is one",
    ),
    "vllm-mlx": Server(
        name="vllm-mlx", version="0.6.0",
        requirements=["vllm-mlx==0.6.0"],
        overrides=["torchvision" + venvs.NEVER],  # image models only; it would pull CUDA torch
        cpu_torch=True,
        command=lambda bin_dir, model, port: [os.path.join(bin_dir, "vllm-mlx"), "serve", model,
                                              "--host", "127.0.0.1", "--port", str(port),
                                              "--served-model-name", "tiny", "--offline"],
        modes={"continuous-batching": ["--continuous-batching"], "default": []},
        note="torchvision left out (uv override)",
        serialized_modes=("default",),  # SimpleEngine: 503 text_generation_busy while one runs
        stream_conversation_modes=("default",),  # SimpleEngine's system-prompt KV cache: stream_chat only
        conversation_words=160,  # its memory-aware prefix cache keeps prefixes of >= 128 tokens only
    ),
    # A FastAPI app as a user writes it, knowing nothing of the shim (apps/to_thread_app.py):
    # each request runs mlx_lm.generate on asyncio.to_thread. It shows the batch mode's gain.
    "to-thread-app": Server(
        name="to-thread-app", version="1",
        requirements=["mlx-lm==0.32.2", "fastapi", "uvicorn"],
        overrides=[],
        cpu_torch=False,
        command=lambda bin_dir, model, port: [os.path.join(bin_dir, "python"), APPS_TO_THREAD,
                                              "--model", model, "--port", str(port)],
        modes={"default": []},
        note="conformance/apps/to_thread_app.py: FastAPI + uvicorn, generate() on asyncio.to_thread",
        packages=["mlx", "mlx-lm", "fastapi", "uvicorn", "transformers"],
        prompt_cache=False,
        throughput=True,
        sides=("none", "run", "env", "batch"),
    ),
}

# Word-level tokenizer of the tiny models: words w0 .. w295.
PROMPTS = [f"w{5 + 3 * i} w{7 + i} w9 w{11 + 2 * i}" for i in range(CONCURRENT)]

# The throughput probe (servers with `throughput`): THROUGHPUT_REQUESTS non-streaming requests
# at once, THROUGHPUT_TOKENS each, one warm-up burst, then THROUGHPUT_BURSTS measured ones.
# Greedy decoding of these prompts meets no EOS within 48 tokens on either tiny model (checked
# with mlx-lm 0.32.2); the rate counts the completion tokens each answer's usage reports anyway.
THROUGHPUT_REQUESTS = 8
THROUGHPUT_TOKENS = 48
THROUGHPUT_BURSTS = 7
THROUGHPUT_PROMPTS = [f"w{20 + 7 * i} w{31 + 5 * i} w{13 + i} w{40 + 3 * i}" for i in range(THROUGHPUT_REQUESTS)]


def conversation(words: int):
    """A four-message conversation of about `words` prompt tokens (the tiny chat template joins contents)."""
    sizes = [words // 2, words // 4, words // 8]
    sizes.append(words - sum(sizes))
    roles = ["system", "user", "assistant", "user"]
    out, start = [], 10
    for role, size in zip(roles, sizes):
        out.append({"role": role, "content": " ".join(f"w{start + i}" for i in range(size))})
        start += size
    return out


def free_port() -> int:
    """A free port in 18700-18799, tried in random order (other harnesses may use the range too)."""
    import random

    for port in random.sample(list(PORTS), len(PORTS)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18700-18799")


def _request(port: int, method: str, path: str, body: Optional[Dict[str, Any]] = None,
             timeout: float = REQUEST_TIMEOUT) -> Tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body) if body is not None else None
        connection.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


BUSY_RETRIES = 240


def _chat(port: int, model: str, messages: List[Dict[str, str]], stream: bool,
          busy: Optional[List[int]] = None, max_tokens: int = MAX_TOKENS) -> Dict[str, Any]:
    """One chat completion: {'text', 'usage'}; raises with what went wrong.

    With `busy` (a list to count into), an HTTP 503 whose body says the server is busy is
    retried after a pause, at most BUSY_RETRIES times.
    """
    for _attempt in range(BUSY_RETRIES + 1):
        answer = _chat_once(port, model, messages, stream, max_tokens)
        if busy is None or answer is not None:
            break
        busy.append(1)
        time.sleep(0.25)
    if answer is None:
        raise RuntimeError(f"still busy after {BUSY_RETRIES} retries")
    return answer


def _chat_once(port: int, model: str, messages: List[Dict[str, str]], stream: bool,
               max_tokens: int = MAX_TOKENS) -> Optional[Dict[str, Any]]:
    body: Dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    for attempt in range(3):  # a connection reset before any response is retried, as clients do
        try:
            status, data = _request(port, "POST", "/v1/chat/completions", body)
            break
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            if attempt == 2:
                raise
            time.sleep(0.5)
    if status == 503 and b"busy" in data:
        return None
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
    if not stream:
        decoded = json.loads(data)
        content = decoded["choices"][0]["message"].get("content")
        if not isinstance(content, str):
            raise RuntimeError(f"no text in {decoded['choices'][0]!r}"[:300])
        return {"text": content, "usage": decoded.get("usage")}
    text, usage, done = [], None, False
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        chunk = line[5:].strip()
        if chunk == "[DONE]":
            done = True
            continue
        decoded = json.loads(chunk)
        if decoded.get("error"):
            raise RuntimeError(f"stream error: {decoded['error']!r}"[:300])
        usage = decoded.get("usage") or usage
        for choice in decoded.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
    if not done:
        raise RuntimeError(f"stream ended without [DONE]: {data[-200:]!r}")
    return {"text": "".join(text), "usage": usage}


def _numbers(tree: Any, prefix: str = "") -> Dict[str, float]:
    """Every numeric leaf of a JSON tree, by dotted path."""
    out: Dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = tree
    return out


def _cache_counters(port: int) -> Optional[Dict[str, float]]:
    try:
        status, data = _request(port, "GET", "/v1/cache/stats", timeout=15)
    except OSError:
        return None
    if status != 200:
        return None
    return {k: v for k, v in _numbers(json.loads(data)).items()
            if re.search(r"(tokens_saved|(^|\.)hits)$", k)}


def _listeners(port: int) -> Optional[set]:
    """Inodes of the sockets listening on 127.0.0.1:`port` (Linux /proc), or None where unknown."""
    try:
        with open("/proc/net/tcp") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return None
    wanted = f"0100007F:{port:04X}"
    return {row.split()[9] for row in rows if row.split()[1] == wanted and row.split()[3] == "0A"}


def _ours(port: int, session: int) -> bool:
    """Whether the socket listening on `port` belongs to a process of our server's session."""
    inodes = _listeners(port)
    if inodes is None:
        return True  # no /proc: cannot tell
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != session:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
        except OSError:
            continue
    return False


def _wait_ready(port: int, process: subprocess.Popen, timeout: float) -> str:
    """Wait until our server's GET /v1/models answers 200; returns the first model id.

    Another program may take the port while ours loads: only a listener that belongs to
    the server's own session counts.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        if _listeners(port) and not _ours(port, process.pid):
            raise RuntimeError(f"port {port} was taken by another program while the server started")
        try:
            status, data = _request(port, "GET", "/v1/models", timeout=5)
            if status == 200:
                models = json.loads(data).get("data") or []
                return models[0]["id"] if models else "tiny"
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException, ValueError) as error:
            last = f"{type(error).__name__}"
        time.sleep(1.0)
    raise RuntimeError(f"server not ready after {timeout:.0f}s ({last})")


def _stop(process: subprocess.Popen) -> Optional[int]:
    """SIGINT to the server's process group, then SIGKILL; returns its exit code (None if killed)."""
    code: Optional[int] = None
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
    else:
        code = process.returncode
    try:  # whatever is left of the group (handler subprocesses, resource trackers)
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=30)
    return code


def bad_lines(lines: List[str]) -> List[str]:
    return [line.strip()[:300] for line in lines if any(mark in line for mark in BAD_MARKS)]


# ------------------------------------------------------------------ the shim adds no output line
#
# A shimmed side's output (stdout + stderr, ANSI codes removed) is compared with that of the
# side without the shim after each line is normalised. Every rule below replaces something a
# second run of the very same command prints differently, and nothing else: the number of
# a figure that is a time, a speed, a size, an identity or an address, never a whole line.
_NUMBER = r"\d+(?:[.,]\d+)?"
NORMALISE: List[Tuple[str, "re.Pattern[str]", str]] = [
    # Wall-clock timestamps (log prefixes, uvicorn's access log, HTTP dates).
    ("timestamp", re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"),
     "<time>"),
    ("timestamp", re.compile(r"\d{1,2}/[A-Z][a-z]{2}/\d{4}[ :]\d{2}:\d{2}:\d{2}(?: [+-]\d{4})?"), "<time>"),
    ("timestamp", re.compile(r"\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<time>"),
    ("timestamp", re.compile(r"\b1[6-9]\d{8}(?:\.\d+)?\b"), "<epoch>"),  # Unix seconds, e.g. `created`
    # Process ids: uvicorn's "Started server process [1234]", "pid=1234", "PID 1234".
    ("pid", re.compile(r"(?i)(\bprocess\s*\[?|\bpid\b[\s=:\[]*)\d+"), r"\1<pid>"),
    # Addresses: host:port pairs (the client's ephemeral port in access logs), object
    # reprs ("at 0x7f..."), and our own port wherever it is printed bare (handled by `port`).
    ("address", re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d+\b"), "<host:port>"),
    ("address", re.compile(r"\blocalhost:\d+\b"), "<host:port>"),
    ("address", re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "<0x>"),
    # Request and object ids: uuids, chatcmpl-..., and 16+ hex digits (request / cache ids).
    ("id", re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<uuid>"),
    ("id", re.compile(r"\b(chatcmpl|cmpl|req|request)[-_][A-Za-z0-9_-]{6,}"), r"\1-<id>"),
    ("id", re.compile(r"\b[0-9a-f]{16,}\b"), "<hex>"),
    # vllm-mlx logs a request by the first 12 characters of its uuid ("6cc6bb63-8cd").
    ("id", re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{3,4}\b"), "<uuid>"),
    # Scheduler counters printed at the moment a request is scheduled or looked up (vllm-mlx:
    # "uid=3 ... running=4 waiting=5", "entries=2"): which of the 9 concurrent requests
    # arrives first and how deep the queues are then differs between two runs of one side.
    ("scheduling", re.compile(r"\b(uid|running|waiting|entries)=\d+"), r"\1=<n>"),
    # Temporary paths (tempfile names differ per run).
    ("temp path", re.compile(r"/tmp/[^\s'\",:)\]]+"), "<tmp>"),
    # Durations and speeds: "took 0.41 s", "12.3 tokens/s", "35ms", "1.2 it/s", "in 3.2 seconds".
    ("duration/speed", re.compile(_NUMBER + r"\s*(tokens?/s(?:ec)?|tokens?-per-sec(?:ond)?|tok/s|toks/s|it/s|"
                                  r"s/it|req/s|ms|µs|us|ns|s|sec|secs|seconds?|minutes?|min)\b"), r"<n> \1"),
    # Memory figures: "1.23 GB", "512 MiB", "peak memory 0.042".
    ("memory", re.compile(_NUMBER + r"\s*([KMGT]i?B|bytes)\b"), r"<n> \1"),
    ("memory", re.compile(r"(?i)(memory[^0-9]{0,20})" + _NUMBER), r"\1<n>"),
]


def normalise_line(line: str, port: Optional[int] = None, home: Optional[str] = None) -> str:
    """One output line with what differs between two runs of the same command replaced (see NORMALISE).

    `home`: the side's temporary HOME; `port`: the side's own port, wherever it is printed.
    """
    line = line.rstrip()
    if home:
        line = line.replace(os.path.realpath(home), "<home>").replace(home, "<home>")
    for _what, pattern, replacement in NORMALISE:
        line = pattern.sub(replacement, line)
    if port is not None:
        line = re.sub(rf"(?<![\d.]){port}(?![\d.])", "<port>", line)
    return line


def normalise_output(lines: List[str], port: Optional[int] = None, home: Optional[str] = None) -> List[str]:
    """Every non-blank line of an output, normalised."""
    return [normalise_line(line, port, home) for line in lines if line.strip()]


def shim_only_lines(without: List[str], with_shim: List[str]) -> List[str]:
    """The normalised lines the shimmed output has and the output without the shim lacks.

    A set difference, not a multiset one: how often a per-request or per-batch line repeats
    depends on scheduling (how many HTTP 503 "busy" retries the single-request mode answered,
    how the continuous batcher grouped the burst), so a count differs between two runs of
    the same side; what the shim could add to a program's output (a warning, a note, a log
    line) is a line the program never prints, which a set difference catches. In the order
    the shimmed output has them, each once.
    """
    seen = set(without)
    extra: List[str] = []
    for line in with_shim:
        if line not in seen:
            seen.add(line)
            extra.append(line)
    return extra


def build_model(python: str, arch: str) -> str:
    """A tiny random-weight model made by the target's own mlx / mlx-lm (no download)."""
    done = subprocess.run([python, "-c", "import sys; from mlx_threadsafe import testing; "
                                         "print(testing.build_lm(sys.argv[1]))", arch],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny {arch} model failed: {done.stderr.strip()[-400:]}")
    return done.stdout.strip().splitlines()[-1]


def side_environment(env: Dict[str, str], side: str) -> Dict[str, str]:
    """`env` with the shim's switches of `side`: none, `MLX_THREADSAFE=1` (env), and with
    `MLX_THREADSAFE_BATCH=1` too (batch); `run` puts `mlx-threadsafe run --` before the command."""
    env = dict(env)
    for name in ("MLX_THREADSAFE", "MLX_THREADSAFE_DISABLE", "MLX_THREADSAFE_BATCH", "PYTHONPATH"):
        env.pop(name, None)
    if side in ("env", "batch"):
        env["MLX_THREADSAFE"] = "1"
    if side == "batch":
        env["MLX_THREADSAFE_BATCH"] = "1"
    return env


def _at_once(count: int, client: Callable[[int], None]) -> None:
    """client(0) .. client(count - 1), each on a thread of its own, all started before any is awaited (bounded)."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT + 30)


def measure_throughput(port: int, served: str, record: Dict[str, Any],
                       chat: Optional[Callable[..., Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The throughput probe: completion tokens/s of THROUGHPUT_REQUESTS requests at once.

    First the probe's prompts one at a time (the reference its concurrent answers must equal,
    and the rate of one request at a time), then a warm-up burst, then THROUGHPUT_BURSTS
    measured bursts, each timed from the first request sent to the last answer received;
    a burst's rate is the sum of the completion tokens the answers report over that time.
    Failures go to record["failures"]; the figures are recorded, never judged.
    """
    chat = chat or _chat

    def ask(index: int) -> Dict[str, Any]:
        return chat(port, served, [{"role": "user", "content": THROUGHPUT_PROMPTS[index]}], stream=False,
                    max_tokens=THROUGHPUT_TOKENS)

    probe: Dict[str, Any] = {"requests": THROUGHPUT_REQUESTS, "max_tokens": THROUGHPUT_TOKENS,
                             "bursts": THROUGHPUT_BURSTS, "burst_tokens_per_s": [], "burst_completion_tokens": []}
    serial: List[Optional[str]] = []
    tokens = 0
    started = time.perf_counter()
    for index in range(THROUGHPUT_REQUESTS):
        try:
            answer = ask(index)
            serial.append(answer["text"])
            tokens += int((answer.get("usage") or {}).get("completion_tokens") or 0)
        except Exception as error:  # noqa: BLE001 - counted and reported
            serial.append(None)
            record["failures"].append(f"throughput serial #{index}: {type(error).__name__}: {error}"[:400])
    probe["serial_tokens_per_s"] = round(tokens / (time.perf_counter() - started), 1) if tokens else None
    equal, answered = 0, 0
    for burst in range(THROUGHPUT_BURSTS + 1):  # burst 0 warms up
        answers: List[Optional[Dict[str, Any]]] = [None] * THROUGHPUT_REQUESTS

        def client(index: int, answers=answers, burst=burst) -> None:
            try:
                answers[index] = ask(index)
            except Exception as error:  # noqa: BLE001
                record["failures"].append(f"throughput burst {burst} #{index}: {type(error).__name__}: {error}"[:400])

        started = time.perf_counter()
        _at_once(THROUGHPUT_REQUESTS, client)
        elapsed = time.perf_counter() - started
        if burst == 0:
            continue
        done = [a for a in answers if a is not None]
        answered += len(done)
        equal += sum(a is not None and a["text"] == s for a, s in zip(answers, serial))
        completion = sum(int((a.get("usage") or {}).get("completion_tokens") or 0) for a in done)
        probe["burst_completion_tokens"].append(completion)
        if len(done) == THROUGHPUT_REQUESTS and completion:
            probe["burst_tokens_per_s"].append(round(completion / elapsed, 1))
    probe["answered"] = answered
    probe["equal_to_serial"] = equal
    rates = probe["burst_tokens_per_s"]
    probe["tokens_per_s"] = round(statistics.median(rates), 1) if len(rates) == THROUGHPUT_BURSTS else None
    return probe


def check_side(server: Server, mode: str, model_dir: str, side: str, python: str) -> Dict[str, Any]:
    """One server start on one side; the measured record."""
    bin_dir = os.path.dirname(python)
    port = free_port()
    command = server.command(bin_dir, model_dir, port) + server.modes[mode]
    env = side_environment(dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                                NO_COLOR="1", VIRTUAL_ENV=os.path.dirname(bin_dir),
                                PATH=bin_dir + os.pathsep + os.environ.get("PATH", "")), side)
    if side == "run":
        command = [os.path.join(bin_dir, "mlx-threadsafe"), "run", "--"] + command
    for name in ("MLX_THREADSAFE_LOG", "MLX_THREADSAFE_LOG_FILE"):
        env.pop(name, None)
    record: Dict[str, Any] = {"side": side, "command": " ".join(os.path.basename(c) if i == 0 else c
                                                                for i, c in enumerate(command)),
                              "requests": CONCURRENT, "answered": 0, "reference_answered": 0,
                              "equal_to_reference": 0, "cached_tokens": None, "cache_source": None,
                              "failures": [], "bad_output": [], "exit_code": None}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conformance-") as home, \
            tempfile.TemporaryFile() as output:
        # An empty hub cache and a fresh HOME on every side: vllm-mlx saves its prefix cache
        # under ~/.cache at exit and loads it at start-up, which would carry hits across runs.
        env["HF_HOME"] = os.path.join(home, "hf")
        env["HOME"] = home
        shim_log = os.path.join(home, "mlx_threadsafe.log")
        if side != "none":
            # Each process that installs the shim (`run` and MLX_THREADSAFE=1 start every Python
            # process of the server with it) appends the patches it applies to this file, not
            # to stderr: the server's own output stays what it is without the shim.
            env["MLX_THREADSAFE_LOG"] = "debug"
            env["MLX_THREADSAFE_LOG_FILE"] = shim_log
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=home,
                                   start_new_session=True)
        try:
            served = _wait_ready(port, process, READY_TIMEOUT)
            record["ready_s"] = round(time.monotonic() - started, 1)
            concurrent: List[Optional[str]] = [None] * CONCURRENT
            serialized = mode in server.serialized_modes
            busy: Optional[List[int]] = [] if serialized else None

            def client(index: int) -> None:
                try:
                    concurrent[index] = _chat(port, served, [{"role": "user", "content": PROMPTS[index]}],
                                              stream=index % 2 == 1 and not serialized, busy=busy)["text"]
                except Exception as error:  # noqa: BLE001 - counted and reported
                    record["failures"].append(f"concurrent #{index}: {type(error).__name__}: {error}"[:400])

            _at_once(CONCURRENT, client)
            record["answered"] = sum(text is not None for text in concurrent)
            if serialized:
                record["busy_retries"] = len(busy)
                record["streaming"] = "none: this mode serves one request at a time (HTTP 503 busy, retried)"
            serial: List[Optional[str]] = []
            for index, prompt in enumerate(PROMPTS):
                try:
                    serial.append(_chat(port, served, [{"role": "user", "content": prompt}], stream=False)["text"])
                except Exception as error:  # noqa: BLE001
                    serial.append(None)
                    record["failures"].append(f"serial #{index}: {type(error).__name__}: {error}"[:400])
            record["reference_answered"] = sum(text is not None for text in serial)
            record["equal_to_reference"] = sum(a is not None and a == b for a, b in zip(concurrent, serial))
            record["mismatches"] = [{"prompt": PROMPTS[i], "concurrent": a, "serial": b}
                                    for i, (a, b) in enumerate(zip(concurrent, serial))
                                    if a is not None and b is not None and a != b][:3]
            # The repeated conversation.
            if not server.prompt_cache:
                record["cache_check"] = "not applicable: the server keeps no prompt cache"
            usages = [] if server.prompt_cache else [None, None]
            middle = None
            for attempt in range(2 if server.prompt_cache else 0):
                try:
                    usages.append(_chat(port, served, conversation(server.conversation_words),
                                        stream=mode in server.stream_conversation_modes)["usage"] or {})
                except Exception as error:  # noqa: BLE001
                    usages.append(None)
                    record["failures"].append(f"conversation #{attempt}: {type(error).__name__}: {error}"[:400])
                if attempt == 0:
                    time.sleep(0.5)
                    middle = _cache_counters(port)
            after = _cache_counters(port)
            second = usages[1] if len(usages) > 1 else None
            record["prompt_tokens"] = (second or {}).get("prompt_tokens")
            details = (second or {}).get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                record["cached_tokens"] = details["cached_tokens"]
                record["cache_source"] = "usage.prompt_tokens_details.cached_tokens"
            elif middle is not None and after is not None:
                deltas = {k: after[k] - middle.get(k, 0) for k in after if after[k] != middle.get(k, 0)}
                record["cache_counters_delta"] = deltas
                saved = [v for k, v in deltas.items() if k.endswith("tokens_saved")]
                hits = [v for k, v in deltas.items() if k.endswith("hits")]
                record["cached_tokens"] = int(sum(saved)) if saved else (0 if not hits else None)
                record["cache_hits"] = int(sum(hits))
                record["cache_source"] = "GET /v1/cache/stats (tokens_saved, hits) around the second send"
            if server.throughput:
                record["throughput"] = measure_throughput(port, served, record)
        except Exception as error:  # noqa: BLE001 - a server that never got ready
            record["failures"].append(f"server: {type(error).__name__}: {error}"[:400])
        finally:
            record["exit_code"] = _stop(process)
            record["wall_s"] = round(time.monotonic() - started, 1)
            output.seek(0)
            text = ANSI.sub("", output.read().decode("utf-8", "replace"))
            lines = text.splitlines()
            shim_lines: List[str] = []
            if os.path.exists(shim_log):
                with open(shim_log, encoding="utf-8", errors="replace") as log_file:
                    shim_lines = log_file.read().splitlines()
            normalised = normalise_output(lines, port=port, home=home)
    os.makedirs(LOGS, exist_ok=True)  # the whole output, for reading (git-ignored)
    log = os.path.join(LOGS, f"{server.name}-{mode}-{os.path.basename(model_dir)}-{side}.log")
    with open(log, "w") as out:
        out.write(text)
    record["log"] = os.path.relpath(log, venvs.ROOT)
    if record.get("cache_hits") and not record.get("cached_tokens"):
        # vllm-mlx's SimpleEngine counts hits only; its log says how many tokens a hit reused.
        reused = [int(m.group(1)) for m in map(LOG_REUSED.search, lines) if m]
        if reused:
            record["cached_tokens"] = reused[-1]
            record["cache_source"] = ("server log: 'System KV cache HIT ... reusing N tokens' "
                                      "(hits counted in /v1/cache/stats)")
    record["bad_output"] = bad_lines(lines)[:12]
    # Proof that the shim was there: the patches it applied, from its debug log file.
    record["shim_applied"] = sorted({m.group(1) for m in map(SHIM_APPLIED.search, shim_lines) if m})
    record["shim_log_lines"] = len(shim_lines)
    record["output_lines"] = len(lines)
    record["output_tail"] = "\n".join(line[:300] for line in lines[-25:])
    record["port"] = port
    record["_normalised"] = normalised  # for the comparison of the sides in run(); not saved
    record["cache_reused"] = bool(record.get("cached_tokens") or record.get("cache_hits"))
    probe = record.get("throughput")
    record["ok"] = (record["answered"] == CONCURRENT and record["reference_answered"] == CONCURRENT
                    and record["equal_to_reference"] == CONCURRENT
                    and (record["cache_reused"] or not server.prompt_cache)
                    and (probe is None or probe["equal_to_serial"] == probe["answered"]
                         == THROUGHPUT_REQUESTS * THROUGHPUT_BURSTS)
                    and not record["bad_output"] and not record["failures"]
                    and (side == "none" or bool(record["shim_applied"])))
    return record


def summary(record: Dict[str, Any]) -> str:
    if record.get("status") == "cannot-run":
        return f"cannot run: {record.get('reason')}"
    cached = record.get("cached_tokens")
    text = (f"{record['answered']}/{record['requests']} answered, {record['equal_to_reference']}/{record['requests']} "
            f"equal to serial, " + ("no prompt cache" if str(record.get("cache_check", "")).startswith("not applicable")
                                    else f"cached {cached if cached is not None else '-'}"))
    probe = record.get("throughput")
    if probe:
        runs = probe["requests"] * probe["bursts"]
        rate = probe.get("tokens_per_s")
        text += (f"; {probe['requests']} at once x {probe['max_tokens']} tokens: "
                 f"{f'{rate:g} tok/s' if rate is not None else 'no rate'}, {probe['equal_to_serial']}/{runs} "
                 f"equal to serial")
    if record.get("side") in ("run", "env", "batch") and not record.get("shim_applied"):
        text += ", the shim applied no patch in the server (no 'mlx_threadsafe: applied' line)"
    if record.get("shim_only_lines"):
        count = record.get("shim_only_count", len(record["shim_only_lines"]))
        text += (f", {count} output line{'s' if count != 1 else ''} only with the shim: "
                 f"{record['shim_only_lines'][0][:120]!r}")
    if record.get("bad_output"):
        text += f", output: {record['bad_output'][0][:100]!r}"
    elif record.get("failures"):
        text += f", first failure: {record['failures'][0][:120]}"
    return text


def _cells(name: str, server: Server, modes, models, sides):
    """Every (key, mode, model, side) to check for `server`, in order."""
    for mode in modes or list(server.modes):
        if mode not in server.modes:
            continue
        for arch in models or MODELS:
            for side in sides or server.sides:
                yield f"server/{name}=={server.version}/{mode}/{arch}/{side}", mode, arch, side


def run(names: Optional[List[str]] = None, modes: Optional[List[str]] = None, models: Optional[List[str]] = None,
        sides: Optional[List[str]] = None, progress: Callable[[str], None] = print,
        finished: Callable[[str, Dict[str, Any]], None] = lambda key, record: None) -> None:
    """Run every selected (server, mode, model, side); each record is handed to `finished` as it ends."""
    for name in names or list(SERVERS):
        server = SERVERS[name]
        base = {"kind": "server", "target": server.name, "version": server.version, "note": server.note,
                "when": today()}
        try:
            python = venvs.target_python(server.venv, server.requirements, server.overrides, server.cpu_torch)
            installed = venvs.versions_in(python, [server.name] + server.packages)
            model_dirs = {arch: build_model(python, arch) for arch in (models or MODELS)}
        except (venvs.CannotInstall, RuntimeError, subprocess.SubprocessError) as error:
            for key, mode, arch, side in _cells(name, server, modes, models, sides):
                record = dict(base, mode=mode, model=arch, side=side, status="cannot-run",
                              reason=f"{type(error).__name__}: {error}"[:600], ok=None)
                progress(f"{key}: cannot run: {record['reason'][:200]}")
                finished(key, record)
            continue
        baselines: Dict[Tuple[str, str], Tuple[List[str], str]] = {}  # (mode, arch) -> a passing none side's output
        ran_none: set = set()
        for key, mode, arch, side in _cells(name, server, modes, models, sides):
            record = dict(base, mode=mode, model=arch, versions=installed,
                          **check_side(server, mode, model_dirs[arch], side, python))
            normalised = record.pop("_normalised")
            if side == "none":
                ran_none.add((mode, arch))
                if record["ok"]:
                    baselines[(mode, arch)] = (normalised, "the side without the shim of this run")
            else:
                compare_with_baseline(record, normalised, baselines, server, mode, arch, model_dirs,
                                      none_ran=(mode, arch) in ran_none)
            record["status"] = "pass" if record["ok"] else "fail"
            progress(f"{key}: {record['status']}: {summary(record)} ({record['wall_s']}s)")
            finished(key, record)


def _saved_baseline(server: Server, mode: str, arch: str, model_dir: str) -> Optional[List[str]]:
    """The output of an earlier side without the shim, from its log (when this run has none)."""
    log = os.path.join(LOGS, f"{server.name}-{mode}-{os.path.basename(model_dir)}-none.log")
    if not os.path.exists(log):
        return None
    with open(log, encoding="utf-8", errors="replace") as source:
        lines = source.read().splitlines()
    # The port and HOME of that run are not known here: the generic rules cover
    # 127.0.0.1:PORT and /tmp/...; a bare port number would show up as a shim-only line.
    return normalise_output(lines)


def compare_with_baseline(record: Dict[str, Any], normalised: List[str],
                          baselines: Dict[Tuple[str, str], Tuple[List[str], str]], server: Server,
                          mode: str, arch: str, model_dirs: Dict[str, str], none_ran: bool = True) -> None:
    """Record the shimmed side's `shim_only_lines` against a passing side without the shim; fail on any.

    The baseline is the side without the shim of the same server, mode and model in this run
    (or, when this run has none, the log an earlier run left). Where that side failed (its
    output then holds errors and lacks the lines of requests that succeed), the baseline is
    a passing side without the shim of the same server and mode on the other model, with
    each model's folder replaced by `<model>`; where none passed, nothing is compared (noted).
    """
    baseline = baselines.get((mode, arch))
    if baseline is None and not none_ran:
        saved = _saved_baseline(server, mode, arch, model_dirs[arch])
        if saved is not None:
            baseline = (saved, "the log of an earlier run without the shim (none in this run)")
    if baseline is None:
        for (other_mode, other), (lines, _) in baselines.items():
            if other_mode == mode and other != arch:
                baseline = ([line.replace(model_dirs[other], "<model>") for line in lines],
                            f"the side without the shim on {other} (on {arch} it failed)")
                normalised = [line.replace(model_dirs[arch], "<model>") for line in normalised]
                break
    if baseline is None:
        record["shim_only_lines"] = None
        record["output_compared_with"] = "nothing: no side without the shim passed"
        return
    lines, where = baseline
    extra = shim_only_lines(lines, normalised)
    record["output_compared_with"] = where
    record["shim_only_lines"] = [line[:300] for line in extra[:20]]
    record["shim_only_count"] = len(extra)
    if extra:
        record["ok"] = False
