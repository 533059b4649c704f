"""A fork server for the cheap exit-sensitive scenarios: pay the imports once, exit fresh each run.

    python benchmarks/abort_scenarios/zygote.py SCENARIO plain|shim COUNT OUTDIR [TIMEOUT]

Installs the shim (shim side) and imports mlx_lm once, touching no MLX array or stream, then
forks COUNT children one after another. Each child runs the scenario's body with its stdout
and stderr in OUTDIR/<i>.out and OUTDIR/<i>.err and leaves the way a script does: SystemExit
up to the top, so the interpreter finalizes (atexit, thread-state teardown, C++ static
destructors) exactly as at the end of tests/exit_script.py. What a fresh `exec` adds on top
(importing mlx_lm and transformers, about 2.2 s of the 2.5 s of one run on 2 cores) happens
once here instead. The parent prints one JSON line per child: its index, exit status
(negative: the signal), seconds, and whether it was stopped after TIMEOUT seconds (SIGABRT
first, so that faulthandler dumps every thread into its .err, then SIGKILL).

Run it with PYTHONFAULTHANDLER=1 (the harness does): the handler enabled here is inherited
by every child and writes to its fd 2, which is the child's .err file.
"""

import json
import os
import signal
import sys
import time

SCENARIO, SIDE, COUNT, OUTDIR = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
TIMEOUT = float(sys.argv[5]) if len(sys.argv) > 5 else 120.0

if SIDE == "shim":
    import mlx_threadsafe

    mlx_threadsafe.install()
import threading  # noqa: E402

from mlx_lm import generate, load  # noqa: E402

from mlx_threadsafe.testing import PROMPT, build_lm  # noqa: E402

MODEL = str(build_lm("llama"))  # built before by the harness: no MLX work here


def thread_end() -> None:
    """tests/exit_script.py after its imports: load, generate once on a thread, join, exit."""
    model, tokenizer = load(MODEL)
    thread = threading.Thread(target=lambda: generate(model, tokenizer, PROMPT, max_tokens=4))
    thread.start()
    thread.join()


def batch_generator_shared() -> None:
    """mlx_threadsafe.scenarios' batch_generator_shared_by_2_threads; prints its JSON outcome line."""
    from mlx_threadsafe.scenarios.catalogue import SCENARIOS

    name = "batch_generator_shared_by_2_threads"
    try:
        detail, ok = SCENARIOS[name](), True
    except Exception as error:  # noqa: BLE001 - the outcome is the report
        detail, ok = f"{type(error).__name__}: {error}", False
    print(json.dumps({"scenario": name, "ok": ok, "detail": str(detail)[:300]}), flush=True)


BODIES = {"thread_end": thread_end, "batch_generator_shared": batch_generator_shared}
if SCENARIO == "batch_generator_shared":
    import mlx_threadsafe.scenarios.batch  # noqa: E402,F401 - registers the scenario before the forks


def child(index: int) -> None:
    for fd, ext in ((1, "out"), (2, "err")):
        target = os.open(os.path.join(OUTDIR, f"{index}.{ext}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    BODIES[SCENARIO]()
    sys.stdout.flush()
    raise SystemExit(0)  # unwinds to the top: a normal interpreter exit, not os._exit


def wait(pid: int) -> "tuple[int, bool]":
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGABRT)  # faulthandler: every thread's stack into the .err
            time.sleep(3)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.005)


def main() -> None:
    for index in range(COUNT):
        sys.stdout.flush()
        sys.stderr.flush()
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(index)
        code, hung = wait(pid)
        print(json.dumps({"i": index, "rc": code, "hung": hung, "seconds": round(time.monotonic() - began, 3)}),
              flush=True)


main()
