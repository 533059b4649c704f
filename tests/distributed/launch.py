"""Start N real MLX ranks with `mlx.launch --backend ring` on 127.0.0.1 and collect each one.

What mlx.launch (mlx 0.32.x, ``mlx/_distributed_utils/launch.py``) does, and what this
helper does about it:

* each rank is ``bash -c '... export MLX_HOSTFILE=<mktemp file>; export MLX_RANK=r;
  exec CMD'`` started with ``Popen`` (no new session, no ``env=``): a rank inherits the
  launcher's whole environment (so ``MLX_THREADSAFE=1`` set for the launcher reaches every
  rank; ``--env K=V`` adds more) and stays in the launcher's process group. This helper
  starts the launcher in a new session, so one ``killpg`` reaches the launcher and every
  rank; it is always sent at the end (SIGKILL), whatever happened.
* the ranks' stdout / stderr are merged into the launcher's, with no rank prefix, and the
  launcher exits 0 even when a rank fails. So every rank's command is wrapped by
  ``rank_wrapper.py`` (``python -S``, stdlib only), which writes ``rank{r}.stdout``,
  ``rank{r}.stderr`` and ``rank{r}.json`` (pid, exit status: negative = signal) to a temp dir.
* once one rank exits non-zero, the launcher SIGTERMs the others (``terminate()``): a rank
  that failed on its own and a rank killed by the launcher are told apart by the
  ``signals`` the wrapper saw (15 = killed by the launcher).
* ``-n N`` with the default host gives the ring hostfile
  ``[["127.0.0.1:P"], ["127.0.0.1:P+1"], ...]`` (``--starting-port P``, one port per rank);
  the launcher leaks a ``mktemp`` file per rank (the hostfile, a pid file): ``TMPDIR`` is
  pointed at the run's own temp dir, removed at the end.

Ports: each launch takes a block of ports in 18800-18899 under an exclusive ``flock`` on a
per-block lock file (so pytest-xdist workers, or two sessions, never share one) and checks
that each port of the block can be bound on 127.0.0.1 right now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WRAPPER = os.path.join(HERE, "rank_wrapper.py")
PORT_FIRST, PORT_LAST = 18800, 18899
BLOCK = 4  # ports per launch: up to 3 ring ranks + 1 HTTP port (or 4 ranks)
LOCK_DIR = os.path.join(tempfile.gettempdir(), "mlx_threadsafe-ring-ports")
EXIT_ABORT = "terminate called without an active exception"
NO_STREAM = "There is no Stream("


def _python_bin(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


@dataclass
class RankResult:
    rank: int
    returncode: Optional[int]  # None: no exit was recorded (the rank never ran, or was SIGKILLed with its wrapper)
    stdout: str
    stderr: str
    signals: List[int] = field(default_factory=list)  # signals the rank's wrapper received (15: launcher's terminate)
    pid: Optional[int] = None
    elapsed: Optional[float] = None

    @property
    def outcome(self) -> Optional[dict]:
        """The last stdout line that is a JSON object (what the rank scripts print), or None."""
        for line in reversed(self.stdout.strip().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return None

    @property
    def aborted(self) -> bool:
        """Ended by `std::terminate` (SIGABRT, and the message on stderr)."""
        return self.returncode == -signal.SIGABRT and EXIT_ABORT in self.stderr

    @property
    def terminated_by_launcher(self) -> bool:
        return signal.SIGTERM in self.signals

    def summary(self) -> str:
        tail = self.stderr.strip().splitlines()[-6:]
        return f"rank {self.rank}: rc={self.returncode} signals={self.signals} outcome={self.outcome}\n  " + \
            "\n  ".join(tail)


class Ranks(list):
    """A list of RankResult, plus the launcher's own result."""

    launcher_returncode: Optional[int] = None
    launcher_stdout: str = ""
    launcher_stderr: str = ""
    launcher_elapsed: float = 0.0
    timed_out: bool = False
    ports: List[int] = []

    def report(self) -> str:
        head = (f"launcher rc={self.launcher_returncode} elapsed={self.launcher_elapsed:.1f}s "
                f"timed_out={self.timed_out} ports={self.ports}")
        return "\n".join([head] + [r.summary() for r in self] +
                         [f"launcher stderr tail: {self.launcher_stderr[-800:]}"])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def port_block(timeout: float = 300.0) -> Iterator[List[int]]:
    """An exclusive block of BLOCK ports in 18800-18899, held (flock) until the block ends."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    blocks = list(range(PORT_FIRST, PORT_LAST + 1 - BLOCK + 1, BLOCK))
    # Start at a different block in each process so that back-to-back runs do not reuse
    # a port whose last connections are still in TIME_WAIT.
    offset = (os.getpid() + int(time.time())) % len(blocks)
    deadline = time.monotonic() + timeout
    while True:
        for i in range(len(blocks)):
            base = blocks[(offset + i) % len(blocks)]
            fd = os.open(os.path.join(LOCK_DIR, f"{base}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            ports = list(range(base, base + BLOCK))
            if not all(_bindable(p) for p in ports):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            try:
                yield ports
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no free port block in {PORT_FIRST}-{PORT_LAST}")
        time.sleep(0.5)


class Ring:
    """A running `mlx.launch --backend ring -n N` job (use `start()`); always `close()` it."""

    def __init__(self, argv: Sequence[str], n: int, ports: List[int], env: Optional[Dict[str, str]] = None,
                 launcher_prefix: Sequence[str] = (), rank_prefix: Sequence[str] = ()):
        self.n = n
        self.ports = ports
        self.dir = tempfile.mkdtemp(prefix="mlx-ring-")
        self.tmp = os.path.join(self.dir, "tmp")
        os.makedirs(self.tmp)
        child_env = dict(os.environ)
        # What a pytest run may have set that must not leak into the ranks.
        for key in ("MLX_THREADSAFE", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST"):
            child_env.pop(key, None)
        child_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TMPDIR=self.tmp,
                         PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        child_env.update(env or {})
        self.command = [*launcher_prefix, _python_bin("mlx.launch"), "--backend", "ring", "-n", str(n),
                        "--starting-port", str(ports[0]), "--",
                        sys.executable, "-S", WRAPPER, self.dir, "--", *rank_prefix, *argv]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=child_env, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.dir, "launcher.stdout"), "wb"),
                                     stderr=open(os.path.join(self.dir, "launcher.stderr"), "wb"),
                                     start_new_session=True)
        self.pgid = self.proc.pid
        self.timed_out = False

    def rank_pids(self) -> Dict[int, int]:
        pids = {}
        for r in range(self.n):
            try:
                with open(os.path.join(self.dir, f"rank{r}.pid")) as f:
                    pids[r] = int(f.read())
            except (OSError, ValueError):
                pass
        return pids

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the launcher and every rank (their process group), like a Ctrl-C does."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait for the launcher; on timeout SIGKILL the whole group and mark `timed_out`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.signal_group(signal.SIGKILL)
            return self.proc.wait(timeout=30)

    def results(self) -> Ranks:
        ranks = Ranks()
        for r in range(self.n):
            base = os.path.join(self.dir, f"rank{r}")
            record: dict = {}
            with contextlib.suppress(OSError, ValueError):
                with open(base + ".json") as f:
                    record = json.load(f)
            texts = []
            for ext in (".stdout", ".stderr"):
                try:
                    with open(base + ext, "rb") as f:
                        texts.append(f.read().decode(errors="replace"))
                except OSError:
                    texts.append("")
            ranks.append(RankResult(r, record.get("returncode"), texts[0], texts[1], record.get("signals", []),
                                    record.get("pid"), record.get("elapsed")))
        ranks.launcher_returncode = self.proc.returncode
        for name in ("stdout", "stderr"):
            with open(os.path.join(self.dir, f"launcher.{name}"), "rb") as f:
                setattr(ranks, f"launcher_{name}", f.read().decode(errors="replace"))
        ranks.launcher_elapsed = time.monotonic() - self.started
        ranks.timed_out = self.timed_out
        ranks.ports = list(self.ports)
        return ranks

    def close(self) -> None:
        """SIGKILL whatever is left of the group (launcher, wrappers, ranks) and remove the temp dir."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        for pid in self.rank_pids().values():  # a rank that left the group (it never should)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def _argv(script_or_argv: Union[str, Sequence[str]], args: Sequence[str]) -> List[str]:
    if isinstance(script_or_argv, str):
        path = script_or_argv if os.path.isabs(script_or_argv) else os.path.join(HERE, script_or_argv)
        return [sys.executable, path, *args]
    return [*script_or_argv, *args]


@contextlib.contextmanager
def start(script_or_argv: Union[str, Sequence[str]], n: int = 2, env: Optional[Dict[str, str]] = None,
          args: Sequence[str] = (), launcher_prefix: Sequence[str] = (), rank_prefix: Sequence[str] = (),
          ports: Optional[List[int]] = None, ports_timeout: float = 300.0) -> Iterator[Ring]:
    """Start the ring (a context manager); closed (group SIGKILLed, temp dir removed) at the end.

    `ports`: a block the caller already holds (`port_block()`), e.g. to give `ports[n:]` to
    an HTTP server on the command line; by default a block is taken here.
    """
    with contextlib.ExitStack() as stack:
        if ports is None:
            ports = stack.enter_context(port_block(ports_timeout))
        assert len(ports) >= n, (ports, n)
        ring = Ring(_argv(script_or_argv, args), n, ports, env, launcher_prefix, rank_prefix)
        try:
            yield ring
        finally:
            ring.close()


def launch(script_or_argv: Union[str, Sequence[str]], n: int = 2, env: Optional[Dict[str, str]] = None,
           timeout: float = 120.0, args: Sequence[str] = (), launcher_prefix: Sequence[str] = (),
           rank_prefix: Sequence[str] = (), independent_exits: bool = False) -> Ranks:
    """Run `script_or_argv` (a script in tests/distributed/, a path, or an argv) on N ring ranks.

    Returns one RankResult per rank (plus the launcher's result as attributes); never leaves
    a process behind: the launcher's process group is SIGKILLed at the end, and on `timeout`.
    `independent_exits`: hide each rank's failure from mlx.launch (its wrapper exits 0), so
    that one rank aborting at exit does not get the others SIGTERMed before they end on
    their own (use it only where no rank can be left waiting in a collective).
    """
    if independent_exits:
        env = dict(env or {}, MLX_RING_WRAPPER_EXIT0="1")
    with start(script_or_argv, n, env, args, launcher_prefix, rank_prefix) as ring:
        ring.wait(timeout)
        time.sleep(0.05)
        return ring.results()


if __name__ == "__main__":  # python tests/distributed/launch.py SCRIPT [ARGS...]: a quick look
    result = launch(sys.argv[1], args=sys.argv[2:])
    print(result.report())
    for rank in result:
        print(f"--- rank {rank.rank} stdout\n{rank.stdout}--- rank {rank.rank} stderr\n{rank.stderr}")
