"""Run scenarios in fresh processes and read their outcomes (a crash or a hang is an outcome too)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

from .catalogue import SCENARIOS, NotApplicable


@dataclass(frozen=True)
class Outcome:
    scenario: str
    ok: bool
    detail: str
    applicable: bool = True



def _outcome(line: Dict[str, object]) -> Outcome:
    return Outcome(str(line["scenario"]), bool(line["ok"]), str(line["detail"]), bool(line.get("applicable", True)))


def run_in_subprocess(name: str, shim: bool, python: Optional[str] = None, timeout: float = 300,
                      env: Optional[Dict[str, str]] = None) -> Outcome:
    return run_batch([name], shim, python, timeout, env)[name]


def _run_until_silent(command: List[str], env: Dict[str, str], timeout: float):
    """Run `command`, killing it once it has printed no line for `timeout` seconds.

    Returns (stdout, returncode or None if killed, stderr). A deadlocked scenario (or a
    process that hangs at exit) costs one `timeout`, however many scenarios came first.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()
    stderr: List[str] = []

    assert process.stdout is not None and process.stderr is not None  # both are PIPE
    stdout_pipe, stderr_pipe = process.stdout, process.stderr

    def pump_stdout() -> None:
        for line in stdout_pipe:
            lines.put(line)
        lines.put(None)

    readers = [threading.Thread(target=pump_stdout, daemon=True),
               threading.Thread(target=lambda: stderr.append(stderr_pipe.read()), daemon=True)]
    for reader in readers:
        reader.start()
    stdout: List[str] = []
    returncode: Optional[int] = None
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            process.wait()
            break
        if line is None:
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # closed its output, then hung
                process.kill()
                process.wait()
            break
        stdout.append(line)
    for reader in readers:
        reader.join(timeout=5)
    return "".join(stdout), returncode, "".join(stderr)


def run_batch(names: List[str], shim: bool, python: Optional[str] = None, timeout: float = 300,
              env: Optional[Dict[str, str]] = None) -> Dict[str, Outcome]:
    """Run scenarios one after another in one fresh process (imports are paid once).

    A scenario that kills its process (segfault, abort) is reported from the exit code,
    one that runs `timeout` seconds without finishing as hung; the ones after it are run
    again, each in a process of its own.
    """
    command = [python or sys.executable, "-m", "mlx_threadsafe.scenarios", *names] + (["--shim"] if shim else [])
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # One string hash for both sides: a release's error that prints a set ({'type', 'factor'})
    # must read the same without and with the shim, or a failure of its own looks like ours.
    child_env.setdefault("PYTHONHASHSEED", "0")
    stdout, returncode, stderr = _run_until_silent(command, child_env, timeout)
    outcomes: Dict[str, Outcome] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            outcome = _outcome(json.loads(line))
            outcomes[outcome.scenario] = outcome
    if len(outcomes) == len(names):
        last = outcomes[names[-1]]
        if returncode != 0 and last.ok:  # every scenario reported, then the process died at exit
            ending = f"exited with {returncode}" if returncode is not None else f"hung for {timeout}s at exit"
            outcomes[last.scenario] = Outcome(last.scenario, False, f"passed, then the process {ending}",
                                              last.applicable)
        return outcomes
    if returncode is None:
        died = f"hung for {timeout}s"
    else:
        died = f"process died (exit {returncode}): {(stderr.strip().splitlines() or ['no output'])[-1]}"
    remaining = [name for name in names if name not in outcomes]
    outcomes[remaining[0]] = Outcome(remaining[0], False, died)
    for name in remaining[1:]:
        outcomes.update(run_batch([name], shim, python, timeout, env))
    return outcomes


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shim = "--shim" in argv
    names = [a for a in argv if not a.startswith("--")]
    unknown = [name for name in names if name not in SCENARIOS]
    if not names or unknown:
        print(f"usage: python -m mlx_threadsafe.scenarios NAME... [--shim]; names: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    if shim:
        import mlx_threadsafe

        mlx_threadsafe.install()
    for name in names:
        applicable = True
        try:
            detail, ok = SCENARIOS[name](), True
        except NotApplicable as reason:
            detail, ok, applicable = str(reason), True, False
        except Exception as error:  # noqa: BLE001 - the outcome is the report
            detail, ok = f"{type(error).__name__}: {error}", False
        print(json.dumps({"scenario": name, "ok": ok, "detail": str(detail)[:300], "applicable": applicable}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

