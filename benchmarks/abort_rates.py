"""Abort rates of the exit-sensitive scenarios, without and with the shim (issue 29 parts 2 and 5).

    python -m benchmarks.abort_rates run --scenario NAME --runs N [--side plain|shim|both] [--parallel P]
                                        [--block B] [--out FILE]
    python -m benchmarks.abort_rates summary [--out FILE]

`run` runs scenario NAME N times per side in fresh processes, the sides alternating in blocks
of B runs (plain, shim, then shim, plain, ...) so that both see the same machine load, P runs
at a time. Every child runs with PYTHONFAULTHANDLER=1; per run it records the exit status
(negative: the signal), whether stderr says `terminate called`, whether the scenario's own
check failed, and for a crash its fault signature: the signal, the `terminate called` and
`Fatal Python error` lines and the top Python frames of the crashing thread (faulthandler's
"Current thread" block, the first 12 lines kept as the example). Python 3.11's faulthandler
prints no native frames; `gdb` would need core dumps, which these runs do not enable.

After every block the counts are added to benchmarks/results/abort-rates.json: one record
per scenario and side (`thread_end/plain`), its totals and one entry per session (date, the
machine stamp, load average, P, B), so counts made at different times add up. `summary`
prints the Markdown table and writes benchmarks/abort_rates.md. Not part of CI.

Scenarios (`--scenario`):

- `thread_end`: tests/exit_script.py (load the tiny llama, generate 4 tokens on a thread, join,
  exit), each run a child forked from a process that imported mlx_lm once and touched no MLX
  state (benchmarks/abort_scenarios/zygote.py); the child exits through the interpreter's
  normal finalization. About 0.2 s a run instead of 2.5 s.
- `thread_end_exec`: the same script, `python tests/exit_script.py plain|shim`, a fresh
  interpreter each run (what benchmarks/exit_runs/run.sh counted).
- `batch_generator_shared` / `batch_generator_shared_exec`: the scenario
  batch_generator_shared_by_2_threads (two threads drive one BatchGenerator), forked as above,
  or `python -m mlx_threadsafe.scenarios NAME [--shim]`; its JSON line must say ok.
- `server_sigint`: harness/soak.py's driver: `mlx_lm.server` on the tiny model (MLX_THREADSAFE=1
  on the shim side), 3 concurrent requests and 1 hang-up, then SIGINT; the server must
  answer all and exit 0 within 30 s.
- `two_rank_exit`: `mlx.launch --backend ring -n 2` on 127.0.0.1 (ports 28100-28199) of
  tests/distributed/rank_thread_exit.py (sharded_load, generate on a thread, join, exit),
  MLX_THREADSAFE=1 for the launcher (and so every rank) on the shim side; each rank's exit
  from its own wrapper record, and whether mlx.launch returned within 30 s of the last rank's
  exit (if not, it gets SIGABRT so that faulthandler writes where it was stuck). The
  launcher's process group is SIGKILLed after every run.
- `ring_server_sigint`: tests/distributed/serving.py's `serve_on_ring`: mlx_lm.server on 2
  ranks, 4 concurrent chats, SIGINT to the launcher's group (the run where the launcher once
  outlived its ranks); rank exits 0, -SIGINT or -SIGTERM (mlx.launch stopping
  the other ranks once one has exited non-zero) count as clean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence

from harness.evidence import load_records, machine, save_records, today, write_text
from harness.markdown import cell, table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
RESULTS = os.path.join(HERE, "results", "abort-rates.json")
MARKDOWN = os.path.join(HERE, "abort_rates.md")
FINDINGS = os.path.join(HERE, "abort_scenarios", "findings.md")  # written by hand; `summary` appends it
ZYGOTE = os.path.join(HERE, "abort_scenarios", "zygote.py")
ABOUT = "python -m benchmarks.abort_rates run --scenario NAME --runs N: exit-sensitive scenarios, per side"
PORTS = (28100, 28199)  # below Linux's ephemeral range (32768-60999): no client connection takes one
LAUNCHER_GRACE = 30.0
STACK_LINES = 12
SIDES = ("plain", "shim")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _frame(line: str) -> str:
    """`  File "/x/y/z.py", line 12 in f` -> `z.py:12 f`."""
    found = re.match(r'\s*File "(?:.*/)?([^"/]+)", line (\d+) in (\S+)', line)
    return f"{found.group(1)}:{found.group(2)} {found.group(3)}" if found else line.strip()


def fault(stderr: str) -> Dict[str, Any]:
    """What stderr says of a crash: `terminate called`, faulthandler's fatal line and the crashing thread's stack."""
    lines = stderr.splitlines()
    terminate = next((line.strip() for line in lines if "terminate called" in line), None)
    fatal = next((line.strip() for line in lines if line.startswith("Fatal Python error")), None)
    stack: List[str] = []
    for index, line in enumerate(lines):
        if line.startswith("Current thread") or (not stack and line.startswith("Thread 0x") and fatal):
            stack = [line]
            for following in lines[index + 1:]:
                if not following.strip():
                    break
                stack.append(following)
            if line.startswith("Current thread"):
                break
    stack = stack[:STACK_LINES + 1]
    what = next((line.strip() for line in lines if line.strip().startswith("what():")), None)
    return {"terminate": terminate, "what": what, "fatal": fatal, "stack": stack}


def signature(rc: Optional[int], hung: bool, info: Dict[str, Any]) -> str:
    """One line that tells crashes apart: how it ended, the C++ and Python fatal lines, the top 3 frames."""
    how = "hung (stopped by the harness)" if hung else (
        _signal_name(-rc) if rc is not None and rc < 0 else f"exit {rc}")
    frames = [_frame(line) for line in info["stack"][1:4]] or (["<no faulthandler stack>"])
    parts = [how, info["terminate"], info["what"], info["fatal"], " < ".join(frames)]
    return "; ".join(part for part in parts if part)


@dataclass
class Run:
    """One run's outcome."""

    rc: Optional[int]  # exit status (negative: the signal); None: no status (stopped by the harness)
    seconds: float
    stderr: str = ""
    stdout: str = ""
    hung: bool = False
    check_failed: Optional[str] = None  # the scenario's own check (tokens, answers) failed
    sigint_is_clean: bool = False
    counts: Optional[Dict[str, int]] = None  # scenario extras (per-rank aborts, launcher outlived ...)
    values: Optional[Dict[str, float]] = None  # scenario extras kept as lists (launcher lag)
    crash_override: Optional[str] = None  # a signature made by the scenario (several ranks)
    example_text: Optional[str] = None  # the excerpt kept for it

    @property
    def terminate_called(self) -> bool:
        return "terminate called" in self.stderr

    @property
    def crashed(self) -> bool:
        if self.crash_override is not None:
            return bool(self.crash_override)
        clean_rc = (0, -signal.SIGINT) if self.sigint_is_clean else (0,)
        return self.hung or self.rc not in clean_rc or self.terminate_called

    def signature(self) -> str:
        if self.crash_override:
            return self.crash_override
        return signature(self.rc, self.hung, fault(self.stderr))

    def example(self) -> str:
        if self.example_text is not None:
            return self.example_text
        info = fault(self.stderr)
        head = [line for line in (info["terminate"], info["what"], info["fatal"]) if line]
        return "\n".join(head + info["stack"]) or self.stderr[-1500:]


# ------------------------------------------------------------------ environments and processes


def child_env(shim: bool = False, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_THREADSAFE", "PYTEST_CURRENT_TEST")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONFAULTHANDLER="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    if shim:
        env["MLX_THREADSAFE"] = "1"
    env.update(extra)
    return env


def _killpg(pgid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def run_process(argv: Sequence[str], env: Dict[str, str], timeout: float) -> Run:
    """argv in a session of its own; on `timeout` SIGABRT (faulthandler dumps), then SIGKILL; always killpg."""
    began = time.monotonic()
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
    hung = False
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            _killpg(process.pid, signal.SIGABRT)
            try:
                stdout, stderr = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                _killpg(process.pid)
                stdout, stderr = process.communicate()
    finally:
        _killpg(process.pid)
    return Run(process.returncode, time.monotonic() - began, stderr, stdout, hung)


def _scenario_line(stdout: str) -> Optional[str]:
    """None if the scenario's JSON line says ok; else what went wrong."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            outcome = json.loads(line)
            return None if outcome.get("ok") else str(outcome.get("detail"))[:200]
    return "no outcome line"


# ------------------------------------------------------------------ scenarios


def forked(scenario: str, check: bool) -> Callable[[str, int, int, float], List[Run]]:
    """n runs through P zygotes (benchmarks/abort_scenarios/zygote.py), n/P children each."""

    def block(side: str, n: int, parallel: int, timeout: float) -> List[Run]:
        scratch = tempfile.mkdtemp(prefix=f"abort-{scenario}-")
        shares = [n // parallel + (1 if i < n % parallel else 0) for i in range(parallel)]
        processes = []
        try:
            for index, share in enumerate(s for s in shares if s):
                outdir = os.path.join(scratch, str(index))
                os.makedirs(outdir)
                processes.append((outdir, subprocess.Popen(
                    [sys.executable, ZYGOTE, scenario, side, str(share), outdir, str(timeout)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
                    start_new_session=True, stdin=subprocess.DEVNULL)))
            runs = []
            for outdir, process in processes:
                try:
                    stdout, stderr = process.communicate(timeout=timeout * (n + 2))
                finally:
                    _killpg(process.pid)
                lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
                if process.returncode != 0 and not lines:
                    raise RuntimeError(f"the {scenario} zygote failed ({process.returncode}):\n{stderr[-3000:]}")
                for line in lines:
                    base = os.path.join(outdir, str(line["i"]))
                    texts = []
                    for ext in ("out", "err"):
                        with open(f"{base}.{ext}", errors="replace") as f:
                            texts.append(f.read())
                    run = Run(line["rc"], line["seconds"], texts[1], texts[0], line["hung"])
                    if check:
                        run.check_failed = _scenario_line(texts[0])
                    runs.append(run)
            return runs
        finally:
            for _, process in processes:
                _killpg(process.pid)
            shutil.rmtree(scratch, ignore_errors=True)

    return block


def each_run(one: Callable[[str, float], Run]) -> Callable[[str, int, int, float], List[Run]]:
    """n calls of one(side, timeout), P at a time."""

    def block(side: str, n: int, parallel: int, timeout: float) -> List[Run]:
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda _: one(side, timeout), range(n)))

    return block


def thread_end_exec(side: str, timeout: float) -> Run:
    return run_process([sys.executable, os.path.join(TESTS, "exit_script.py"), side], child_env(), timeout)


def batch_shared_exec(side: str, timeout: float) -> Run:
    argv = [sys.executable, "-m", "mlx_threadsafe.scenarios", "batch_generator_shared_by_2_threads"]
    run = run_process(argv + (["--shim"] if side == "shim" else []), child_env(), timeout)
    run.check_failed = _scenario_line(run.stdout)
    return run


def _tests_on_path() -> None:
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)


def server_sigint(side: str, timeout: float) -> Run:
    from harness import soak
    from mlx_threadsafe.testing import build_lm

    began = time.monotonic()
    with _ring().port_block() as ports:  # runs side by side (--parallel) never share a port
        result = soak.soak(sys.executable, str(build_lm("llama")), via="env" if side == "shim" else "none",
                           clients=3, hang_ups=1, request_timeout=timeout, port=ports[0])
    run = Run(result.exit_code, time.monotonic() - began, result.stderr_tail, hung=result.exit_code is None)
    if result.answered != result.requests:
        run.check_failed = f"{result.answered}/{result.requests} answered: {result.failures[:1]}"
    run.counts = {"retried_connections": result.retried_connections}
    return run


def _ring():
    """tests/distributed/launch.py with its port blocks taken from this harness's own range."""
    _tests_on_path()
    from distributed import launch as ring_launch

    ring_launch.PORT_FIRST, ring_launch.PORT_LAST = PORTS
    ring_launch.LOCK_DIR = os.path.join(tempfile.gettempdir(), "mlx_threadsafe-abort-rates-ports")
    return ring_launch


def _group_listing(pgid: int) -> str:
    done = subprocess.run(["ps", "-L", "-o", "pid,lwp,ppid,stat,wchan:24,etimes,args", "--sid", str(pgid)],
                          capture_output=True, text=True)
    return done.stdout


def _ranks_run(ranks, began: float, lag: Optional[float], outlived: bool, clean_rcs: Sequence[int],
               check: Callable[[Any], Optional[str]], diagnosis: str = "") -> Run:
    crashes, counts = [], {"launcher_outlived_ranks": int(outlived), "launcher_timed_out": int(ranks.timed_out)}
    examples = []
    for rank in ranks:
        crashed = rank.returncode not in clean_rcs or "terminate called" in rank.stderr
        counts[f"rank{rank.rank}_crashed"] = int(crashed)
        if crashed:
            info = fault(rank.stderr)
            crashes.append(f"rank {rank.rank}: " + signature(rank.returncode, rank.returncode is None, info))
            examples.append(f"--- rank {rank.rank} (exit {rank.returncode})\n" + "\n".join(
                [line for line in (info["terminate"], info["what"], info["fatal"]) if line] + info["stack"]))
    stderr = "\n".join(f"--- rank {rank.rank}\n{rank.stderr[-6000:]}" for rank in ranks)
    if outlived or ranks.timed_out:
        launcher = f"--- launcher: SIGABRT (faulthandler), then the group SIGKILLed\n{ranks.launcher_stderr[-3000:]}"
        examples.append(f"{launcher}\n--- the group then (ps -L)\n{diagnosis}")
    if outlived:
        crashes.append("mlx.launch outlived its ranks by more than 30 s: " + signature(
            None, True, fault(ranks.launcher_stderr)))
    rcs = [rank.returncode for rank in ranks]
    worst = next((rc for rc in rcs if rc not in clean_rcs), 0)
    run = Run(worst, time.monotonic() - began, stderr, hung=ranks.timed_out, counts=counts,
              crash_override="; ".join(crashes), example_text="\n".join(examples))
    run.check_failed = check(ranks)
    if lag is not None:
        run.values = {"launcher_lag_s": round(lag, 2)}
    return run


def _watch(ring, deadline: float) -> Dict[str, Any]:
    """Wait for mlx.launch to return: at most LAUNCHER_GRACE s after both ranks' exits, and not past `deadline`.

    A launcher still running LAUNCHER_GRACE s after its ranks gets SIGABRT first, so that
    faulthandler writes every thread of mlx.launch into its stderr (the group listing from `ps`
    is kept too); past `deadline` (ranks still running) the whole group gets SIGABRT. Then
    the group is SIGKILLed, whatever happened.
    """
    records = [os.path.join(ring.dir, f"rank{r}.json") for r in range(ring.n)]
    out: Dict[str, Any] = {"outlived": False, "lag": None, "diagnosis": ""}
    ranks_done: Optional[float] = None
    launcher_end: Optional[float] = None
    while True:
        now = time.monotonic()
        if ring.proc.poll() is not None:
            launcher_end = time.time()
            break
        if ranks_done is None and all(os.path.exists(path) for path in records):
            ranks_done = now
        if ranks_done is not None and now - ranks_done > LAUNCHER_GRACE:
            out["outlived"] = True
            out["diagnosis"] = _group_listing(ring.pgid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(ring.proc.pid, signal.SIGABRT)  # faulthandler: where mlx.launch is stuck
            with contextlib.suppress(subprocess.TimeoutExpired):
                ring.proc.wait(timeout=5)
            break
        if ranks_done is None and now > deadline:
            ring.timed_out = True
            out["diagnosis"] = _group_listing(ring.pgid)
            ring.signal_group(signal.SIGABRT)  # faulthandler, in every rank and in the launcher
            time.sleep(3)
            break
        time.sleep(0.05)
    if launcher_end is not None:
        # mlx.launch returns once each rank's shell has ended; a rank it stopped (SIGTERM to its
        # shell, once another rank exited non-zero) may still be shutting down: let it record its exit.
        out["ranks_after_launcher"] = _wait_for(records, LAUNCHER_GRACE)
    ring.signal_group(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        ring.proc.wait(timeout=30)
    exits = [os.path.getmtime(path) for path in records if os.path.exists(path)]
    if launcher_end is not None and len(exits) == ring.n:
        out["lag"] = max(0.0, launcher_end - max(exits))  # the wrapper writes rank{r}.json as its rank ends
    return out


def _wait_for(paths: Sequence[str], timeout: float) -> int:
    """Wait until every path exists (at most `timeout` s); how many did not exist at first."""
    missing = [path for path in paths if not os.path.exists(path)]
    deadline = time.monotonic() + timeout
    while any(not os.path.exists(path) for path in missing) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(missing)


def _ring_env(side: str, **extra: str) -> Dict[str, str]:
    env = {"PYTHONFAULTHANDLER": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    if side == "shim":
        env["MLX_THREADSAFE"] = "1"  # the launcher's environment: mlx.launch and every rank
    return env


def two_rank_exit(side: str, timeout: float) -> Run:
    ring_launch = _ring()
    from mlx_threadsafe.testing import build_lm

    began = time.monotonic()
    # MLX_RING_WRAPPER_EXIT0: one rank's abort does not get the other SIGTERMed by mlx.launch.
    env = _ring_env(side, MLX_RING_WRAPPER_EXIT0="1")
    with ring_launch.start("rank_thread_exit.py", n=2, env=env, args=[str(build_lm("llama"))]) as ring:
        watched = _watch(ring, began + timeout)
        ranks = ring.results()

    def check(ranks) -> Optional[str]:
        for rank in ranks:
            outcome = rank.outcome
            if not outcome or outcome.get("error") or not outcome.get("tokens"):
                return f"rank {rank.rank}: {outcome}"
        return None

    return _ranks_run(ranks, began, watched["lag"], watched["outlived"], (0,), check, watched["diagnosis"])


def ring_server_sigint(side: str, timeout: float) -> Run:
    """tests/distributed/serving.py's serve_on_ring, with the launcher watched as in two_rank_exit."""
    ring_launch = _ring()
    from distributed.serving import concurrent_chats, server_argv, wait_listening

    from mlx_threadsafe.testing import build_lm

    began = time.monotonic()
    box: Dict[str, Any] = {"answers": [], "error": None}
    with ring_launch.port_block() as ports:
        http_port = ports[-1]
        with ring_launch.start(server_argv(str(build_lm("llama")), http_port), n=2, env=_ring_env(side),
                               ports=ports) as ring:
            try:
                wait_listening(http_port, lambda: ring.proc.poll() is None, timeout)
                box["answers"] = concurrent_chats(http_port)
                time.sleep(0.5)
            except RuntimeError as error:
                box["error"] = str(error)
            ring.signal_group(signal.SIGINT)  # what a Ctrl-C in the launcher's terminal does
            watched = _watch(ring, time.monotonic() + LAUNCHER_GRACE)
            ranks = ring.results()

    def check(_ranks) -> Optional[str]:
        answers = box["answers"]
        if box["error"] or len(answers) != 4 or any(a.startswith("ERROR") for a in answers):
            return f"{box['error']} {answers}"[:200]
        return None

    # Clean: a rank that ended on the Ctrl-C, or one that mlx.launch then stopped (SIGTERM).
    run = _ranks_run(ranks, began, watched["lag"], watched["outlived"], (0, -signal.SIGINT, -signal.SIGTERM),
                     check, watched["diagnosis"])
    run.counts = dict(run.counts or {}, ranks_ended_after_launcher=watched.get("ranks_after_launcher", 0))
    run.sigint_is_clean = True
    return run


@dataclass
class Scenario:
    what: str
    start: str  # how each run starts: fork (zygote) | exec | launcher
    block: Callable[[str, int, int, float], List[Run]]
    runs_per_block: int
    parallel: int
    timeout: float


SCENARIOS: Dict[str, Scenario] = {
    "thread_end": Scenario("tests/exit_script.py: load, generate on a thread, join, exit (forked child)", "fork",
                           forked("thread_end", check=False), 100, 2, 120),
    "thread_end_exec": Scenario("tests/exit_script.py in a fresh interpreter", "exec",
                                each_run(thread_end_exec), 20, 2, 120),
    "batch_generator_shared": Scenario("batch_generator_shared_by_2_threads (forked child)", "fork",
                                       forked("batch_generator_shared", check=True), 50, 2, 120),
    "batch_generator_shared_exec": Scenario("python -m mlx_threadsafe.scenarios batch_generator_shared_by_2_threads",
                                            "exec", each_run(batch_shared_exec), 20, 2, 120),
    "server_sigint": Scenario("mlx_lm.server, 3 requests + 1 hang-up, then SIGINT (harness/soak.py)", "exec",
                              each_run(server_sigint), 10, 1, 120),
    "two_rank_exit": Scenario("mlx.launch --backend ring -n 2: rank_thread_exit.py; launcher return", "launcher",
                              each_run(two_rank_exit), 5, 1, 150),
    "ring_server_sigint": Scenario("mlx_lm.server on 2 ring ranks, 4 chats, SIGINT to the group", "launcher",
                                   each_run(ring_server_sigint), 5, 1, 150),
}


# ------------------------------------------------------------------ counting


def new_session(scenario: Scenario, side: str, parallel: int, block: int) -> Dict[str, Any]:
    return {"date": today(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "start": scenario.start,
            "parallel": parallel, "block": block, "load_average_1min": round(os.getloadavg()[0], 2),
            "measured_on": machine(**_versions()), "runs": 0, "clean": 0, "crashed": 0, "aborts_by_signal": {},
            "nonzero_exit": {}, "hung": 0, "terminate_called": 0, "check_failed": 0, "seconds_total": 0.0,
            "counts": {}, "values": {}, "signatures": {}, "examples": {}, "check_failures": []}


def _versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for name in ("mlx", "mlx-lm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def add(session: Dict[str, Any], run: Run) -> None:
    session["runs"] += 1
    session["seconds_total"] = round(session["seconds_total"] + run.seconds, 3)
    session["terminate_called"] += int(run.terminate_called)
    session["hung"] += int(run.hung)
    if run.check_failed:
        session["check_failed"] += 1
        if len(session["check_failures"]) < 5:
            session["check_failures"].append(run.check_failed)
    if run.rc is not None and run.rc < 0 and not (run.sigint_is_clean and run.rc == -signal.SIGINT):
        name = _signal_name(-run.rc)
        session["aborts_by_signal"][name] = session["aborts_by_signal"].get(name, 0) + 1
    elif run.rc is not None and run.rc > 0:
        session["nonzero_exit"][str(run.rc)] = session["nonzero_exit"].get(str(run.rc), 0) + 1
    for name, value in (run.counts or {}).items():
        session["counts"][name] = session["counts"].get(name, 0) + value
    for name, value in (run.values or {}).items():
        session["values"].setdefault(name, []).append(value)
    if run.crashed:
        session["crashed"] += 1
        key = run.signature()
        session["signatures"][key] = session["signatures"].get(key, 0) + 1
        session["examples"].setdefault(key, run.example()[-4000:])
    elif not run.check_failed:
        session["clean"] += 1


TOTALS = ("runs", "clean", "crashed", "hung", "terminate_called", "check_failed", "seconds_total")


def totals(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record with its totals recomputed from its sessions."""
    out = {k: v for k, v in record.items() if k not in TOTALS}
    for name in TOTALS:
        out[name] = round(sum(s[name] for s in record["sessions"]), 3)
    for name in ("aborts_by_signal", "nonzero_exit", "counts", "signatures"):
        merged: Dict[str, int] = {}
        for session in record["sessions"]:
            for key, value in session[name].items():
                merged[key] = merged.get(key, 0) + value
        out[name] = merged
    examples: Dict[str, str] = {}
    for session in record["sessions"]:
        for key, value in session["examples"].items():
            examples.setdefault(key, value)
    out["examples"] = examples
    out["seconds_per_run"] = round(out["seconds_total"] / out["runs"], 3) if out["runs"] else None
    out["measured_on"] = record["sessions"][-1]["measured_on"] if record["sessions"] else None
    return out


def run_command(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    parallel = args.parallel or scenario.parallel
    block = args.block or scenario.runs_per_block
    sides = list(SIDES) if args.side == "both" else [args.side]
    os.environ["PYTHONFAULTHANDLER"] = "1"  # for the children of the in-process drivers (soak, ring)
    # A harness started in the background by a shell (`cmd &`) inherits SIGINT ignored, and so
    # would every child: the servers would never see the SIGINT that the scenarios send.
    # A Python-level handler here makes every exec'd child start with SIGINT at its default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    subprocess.run([sys.executable, "-c", "from mlx_threadsafe.testing import build_lm; build_lm('llama')"],
                   check=True, env=child_env(), cwd=ROOT)
    records = load_records(args.out)
    sessions = {}
    for side in sides:
        key = f"{args.scenario}/{side}"
        record = records.setdefault(key, {"scenario": args.scenario, "side": side, "what": scenario.what,
                                           "sessions": []})
        record["what"] = scenario.what
        record["sessions"].append(new_session(scenario, side, parallel, block))
        sessions[side] = record["sessions"][-1]
    left = {side: args.runs for side in sides}
    index = 0
    while any(left.values()):
        for side in (sides if index % 2 == 0 else sides[::-1]):
            n = min(block, left[side])
            if not n:
                continue
            began = time.monotonic()
            runs = scenario.block(side, n, parallel, args.timeout or scenario.timeout)
            for run in runs:
                add(sessions[side], run)
            left[side] -= n
            session = sessions[side]
            print(f"{args.scenario}/{side}: block of {n} in {time.monotonic() - began:.0f} s; "
                  f"session {session['runs']} runs, {session['crashed']} crashed "
                  f"({session['aborts_by_signal']}), {session['terminate_called']} terminate called, "
                  f"{session['check_failed']} failed checks, {session['counts']}", flush=True)
            for side_key in sides:
                key = f"{args.scenario}/{side_key}"
                records[key] = totals(records[key])
            save_records(args.out, records, ABOUT)
        index += 1
    return 0


# ------------------------------------------------------------------ summary


def _rate(crashed: int, runs: int) -> str:
    if not runs:
        return "not run"
    return f"{crashed:,} of {runs:,}" + (f" ({100 * crashed / runs:.1f}%)" if crashed else "")


def summary_text(records: Dict[str, Dict[str, Any]]) -> str:
    names = [name for name in SCENARIOS if any(r["scenario"] == name for r in records.values())]
    lines = ["# Abort rates (issue 29 parts 2 and 5)", "",
             "Made by `python -m benchmarks.abort_rates summary` from `benchmarks/results/abort-rates.json`;",
             "measured with `python -m benchmarks.abort_rates run --scenario NAME --runs N` (see its docstring).",
             "A crash: a run ended by a signal, with `terminate called` on stderr, stopped after its timeout, or",
             "(launcher scenarios) a rank that crashed or an `mlx.launch` still running 30 s after both ranks",
             "exited. Failed checks (a wrong answer, a missing outcome) are counted apart.", ""]
    rows = []
    for name in names:
        plain, shim = records.get(f"{name}/plain", {}), records.get(f"{name}/shim", {})
        rows.append([f"`{name}`", SCENARIOS[name].start,
                     _rate(plain.get("crashed", 0), plain.get("runs", 0)),
                     _rate(shim.get("crashed", 0), shim.get("runs", 0)),
                     f"{plain.get('terminate_called', 0):,} / {shim.get('terminate_called', 0):,}",
                     f"{plain.get('check_failed', 0):,} / {shim.get('check_failed', 0):,}",
                     " / ".join(f"{r['seconds_per_run']:.2f}" if r.get("seconds_per_run") else "-"
                                for r in (plain, shim))])
    lines += table(["scenario", "start", "crashed without the shim", "crashed with the shim",
                    "`terminate called` (without / with)", "failed checks (without / with)",
                    "s per run (without / with)"], rows)
    launcher = [name for name in names if SCENARIOS[name].start == "launcher"]
    if launcher:
        lines += ["", "## The launcher and the ranks", ""]
        rows = []
        for name in launcher:
            for side in SIDES:
                record = records.get(f"{name}/{side}")
                if not record:
                    continue
                counts = record["counts"]
                lags = [v for s in record["sessions"] for v in s["values"].get("launcher_lag_s", [])]
                rows.append([f"`{name}`", "with the shim" if side == "shim" else "without",
                             f"{record['runs']:,}", str(counts.get("rank0_crashed", 0)),
                             str(counts.get("rank1_crashed", 0)), str(counts.get("launcher_outlived_ranks", 0)),
                             f"{max(lags):.2f}" if lags else "-"])
        lines += table(["scenario", "side", "launches", "rank 0 crashed", "rank 1 crashed",
                        "mlx.launch outlived its ranks by > 30 s", "slowest return (s)"], rows)
        lines += ["", "\"slowest return\": the seconds from the last rank's exit to mlx.launch's, over the launches",
                  "where it returned on its own and both ranks left an exit record."]
    lines += ["", "## Fault signatures", ""]
    found = False
    for key in sorted(records):
        record = records[key]
        for sig, count in sorted(record.get("signatures", {}).items(), key=lambda item: -item[1]):
            found = True
            lines.append(f"- `{key}`, {count:,} of {record['runs']:,}: {cell(sig)}")
    if not found:
        lines.append("None.")
    lines += ["", "## Sessions", ""]
    rows = []
    for key in sorted(records):
        for s in records[key]["sessions"]:
            rows.append([f"`{key}`", s["started"], str(s["runs"]), str(s["crashed"]), str(s["parallel"]),
                         str(s["load_average_1min"]),
                         f"{s['measured_on'].get('cpus')} CPUs, mlx {s['measured_on'].get('mlx')}, "
                         f"mlx-lm {s['measured_on'].get('mlx-lm')}, Python {s['measured_on'].get('python')}"])
    lines += table(["record", "started (UTC)", "runs", "crashed", "P", "load (1 min)", "machine"], rows)
    if os.path.exists(FINDINGS):
        with open(FINDINGS) as source:
            lines += ["", source.read().rstrip()]
    return "\n".join(lines) + "\n"


def summary_command(args: argparse.Namespace) -> int:
    text = summary_text(load_records(args.out))
    print(text)
    write_text(args.markdown, text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="abort rates of the exit-sensitive scenarios, per side")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario N times per side; add the counts to the results")
    run.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    run.add_argument("--runs", type=int, required=True, help="runs per side")
    run.add_argument("--side", default="both", choices=["plain", "shim", "both"])
    run.add_argument("--parallel", type=int, help="runs at a time (default: the scenario's, 1 or 2)")
    run.add_argument("--block", type=int, help="runs per side before switching sides (default: the scenario's)")
    run.add_argument("--timeout", type=float, help="seconds before a run counts as hung (default: the scenario's)")
    run.add_argument("--out", default=RESULTS)
    summary = commands.add_parser("summary", help="print the Markdown table; write benchmarks/abort_rates.md")
    summary.add_argument("--out", default=RESULTS)
    summary.add_argument("--markdown", default=MARKDOWN)
    args = parser.parse_args(argv)
    return run_command(args) if args.command == "run" else summary_command(args)


if __name__ == "__main__":
    sys.exit(main())
