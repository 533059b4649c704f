"""Scenario (c): two threads of one rank issue `mx.distributed.all_sum` on the same group at once.

    rank_concurrent_allsum.py [--install] [--sums N] [--join-timeout S]

Thread "allsum-A" starts first: once its first sum is back, thread "allsum-B" starts and
both then run concurrently (A its remaining N-1 sums, B its N sums). So on every rank A is
the first thread to use the group, and B the second. Values are known: rank r, thread t,
sum i sends t*1e6 + i*1000 + r + 1 (int32), so the expected result is
size*(t*1e6 + i*1000) + size*(size+1)/2. Prints one JSON line: per thread, the number of
sums done / wrong, the first wrong ones, and the error (type: message) if one was raised.
Ends with os._exit: a thread stuck in a collective must not keep the rank alive.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, maybe_install  # noqa: E402

maybe_install()

import mlx.core as mx  # noqa: E402


def main():
    sums = int(sys.argv[sys.argv.index("--sums") + 1]) if "--sums" in sys.argv else 200
    join_timeout = float(sys.argv[sys.argv.index("--join-timeout") + 1]) if "--join-timeout" in sys.argv else 60
    group = mx.distributed.init(strict=True, backend="ring")
    rank, size = group.rank(), group.size()
    base = size * (size + 1) // 2
    first_done = threading.Event()
    report = {}

    def worker(t):
        name = threading.current_thread().name
        done, wrong, examples, error = 0, 0, [], None
        try:
            if t == 1:
                first_done.wait(30)
            for i in range(sums):
                value = t * 1_000_000 + i * 1000 + rank + 1
                got = mx.distributed.all_sum(mx.array([value], dtype=mx.int32), group=group).item()
                expected = size * (t * 1_000_000 + i * 1000) + base
                done += 1
                if got != expected:
                    wrong += 1
                    if len(examples) < 5:
                        examples.append([i, expected, got])
                if t == 0 and i == 0:
                    first_done.set()
        except BaseException as e:  # noqa: BLE001 - reported
            error = f"{type(e).__name__}: {e}"
        finally:
            first_done.set()
            report[name] = dict(done=done, wrong=wrong, examples=examples, error=error)

    threads = [threading.Thread(target=worker, args=(t,), name=f"allsum-{'AB'[t]}") for t in (0, 1)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    deadline = start + join_timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    emit(rank=rank, size=size, sums=sums, threads=report, stuck=stuck, elapsed=round(time.monotonic() - start, 2))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
