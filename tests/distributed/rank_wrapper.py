"""Runs one rank's command with its stdout / stderr in per-rank files; records its exit.

`mlx.launch` merges every rank's output into its own stdout / stderr with no rank prefix,
and exits 0 even when a rank fails, so the launch helper inserts this wrapper in front of
the rank's command:

    python -S rank_wrapper.py OUTDIR -- CMD ...

It runs CMD as its child (same process group: a Ctrl-C to the group reaches CMD directly),
writes OUTDIR/rank{MLX_RANK}.stdout / .stderr, and, when CMD ends, OUTDIR/rank{R}.json with
its pid and exit status (negative: the signal that ended it). With MLX_RING_WRAPPER_EXIT0=1
the wrapper itself exits 0 whatever CMD did (the launcher then never stops the other ranks
because of it); otherwise it exits with CMD's code (128+N for a signal N). SIGTERM (what mlx.launch sends
to the other ranks once one rank fails) is forwarded to CMD; SIGINT is left to CMD (the
wrapper only survives it, so it can record CMD's exit). Runs with `-S`: stdlib only, no
site-packages (so MLX_THREADSAFE=1 does not install the shim in the wrapper itself).
"""

import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    outdir = sys.argv[1]
    assert sys.argv[2] == "--", sys.argv
    command = sys.argv[3:]
    rank = os.environ.get("MLX_RANK", "x")
    base = os.path.join(outdir, f"rank{rank}")
    record = {"rank": rank, "argv": command, "wrapper_pid": os.getpid(), "signals": []}
    child = None

    def forward(signum, _frame):
        record["signals"].append(signum)
        if child is not None and child.poll() is None and signum != signal.SIGINT:
            child.send_signal(signum)

    # A Python-level handler (not SIG_IGN): handlers reset to default on exec, so the
    # child still gets its own KeyboardInterrupt.
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    start = time.monotonic()
    with open(base + ".stdout", "wb") as out, open(base + ".stderr", "wb") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err)
        record["pid"] = child.pid
        with open(base + ".pid", "w") as f:
            f.write(str(child.pid))
        while True:
            try:
                returncode = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries anyway
                continue
    record["returncode"] = returncode
    record["elapsed"] = round(time.monotonic() - start, 3)
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, base + ".json")
    if os.environ.get("MLX_RING_WRAPPER_EXIT0") == "1":
        # Hide the rank's failure from mlx.launch, which would otherwise SIGTERM the other
        # ranks at once and mask how they would have ended on their own.
        return 0
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
