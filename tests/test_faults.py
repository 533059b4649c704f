"""Faults under load (issue 29, part 3): the shim never turns a fault into a hang, an abort or a wrong answer.

Each fault is one test with the outcome it must have. Every program runs in a fresh
interpreter (install()/uninstall(), signals and exits are process-wide) on real MLX with
the tiny random-weight llama of mlx_threadsafe.testing (built offline, nothing is
downloaded), and under a time limit: a hang fails the test instead of stalling the run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import EXIT_ABORT, ROOT, run_json, run_python

SETUP = """
    import json, sys, threading, time, gc
    import mlx.core as mx
    import mlx_threadsafe
    from mlx_threadsafe import batching, Worker, WorkerClosed, WorkerQueueFull
    if {shim}:
        mlx_threadsafe.install()
    import mlx_lm
    from mlx_lm import load, stream_generate, generate
    from mlx_lm.generate import BatchGenerator
    from mlx_threadsafe.testing import build_lm, on_new_thread
    MODEL_PATH = str(build_lm("llama"))
    model, tokenizer = load(MODEL_PATH)

    def prompt(i):
        return [5 + (i * 7 + j) % 280 for j in range(6 + i % 4)]

    def tokens(i, max_tokens=12, **kwargs):
        return [r.token for r in stream_generate(model, tokenizer, prompt(i), max_tokens=max_tokens, **kwargs)]

    def wait_until(condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)
"""

# Fails a test whose program hangs; far above what each program needs (a few seconds).
LIMIT_S = 60


def _program(body: str, shim: bool = True) -> str:
    return textwrap.dedent(SETUP.format(shim=shim)) + textwrap.dedent(body)


def _run(body: str, shim: bool = True, **kwargs):
    return run_json(_program(body, shim), timeout=LIMIT_S, **kwargs)


# ------------------------------------------------------------------ 1. uninstall() / install() under load


@pytest.mark.parametrize("batch", [False, True], ids=["direct", "batch_mode"])
def test_uninstall_and_install_while_threads_generate_leave_every_generation_right(batch):
    """Threads generate in a loop while the main thread uninstalls and re-installs six times.

    Exact outcome on this release: no generation fails (with the patches off, a thread
    generates as without the shim; a batched call in flight finishes on its batch), each
    one equals the one-at-a-time greedy reference, and after the last install() new calls
    are patched again (in the batch mode: they join a batch).
    """
    out = _run(f"""
        BATCH = {batch}
        N = 4
        want = [tokens(i) for i in range(N)]  # the reference: one call at a time, on this thread
        mlx_threadsafe.install(batch=BATCH)
        stop, errors, done = threading.Event(), [], [[] for _ in range(N)]

        def generate_in_a_loop(i):
            while not stop.is_set():
                try:
                    done[i].append(tokens(i))
                except BaseException as error:
                    errors.append(f"{{type(error).__name__}}: {{error}}")

        threads = [threading.Thread(target=generate_in_a_loop, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        wait_until(lambda: all(done))
        during = []
        for _ in range(6):
            mlx_threadsafe.uninstall()
            time.sleep(0.15)
            mlx_threadsafe.install(batch=BATCH)
            time.sleep(0.15)
            during.append(sum(map(len, done)))
        batching.reset_stats()
        counts = [len(d) for d in done]
        wait_until(lambda: all(len(d) >= c + 2 for d, c in zip(done, counts)))
        stop.set()
        for t in threads:
            t.join(30)
        print(json.dumps({{
            "errors": errors, "alive": [t.is_alive() for t in threads],
            "wrong": [(i, d) for i in range(N) for d in done[i] if d != want[i]],
            "generations": sum(map(len, done)), "during": during,
            "after": batching.stats()["batched_calls"],
            "states": sorted({{str(row.state) for row in mlx_threadsafe.status()}})}}))
    """)
    assert out["errors"] == [] and not any(out["alive"]), out
    assert out["wrong"] == [], out
    assert out["during"][-1] > out["during"][0], out  # the threads kept generating through the churn
    assert "applied" in out["states"], out
    if batch:
        assert out["after"] >= 8, out  # re-installed: the calls made afterwards joined a batch


# ------------------------------------------------------------------ 2. Ctrl-C and SIGTERM mid-call

SIGNALLED = """
    WHERE, HANDLER = {where!r}, {handler!r}
    tokenizer.eos_token_ids = set()  # no early stop: the generation runs until it is stopped
    if HANDLER == "exit":  # the program's own SIGTERM handler
        import signal
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def generate_for_long():
        for n, _ in enumerate(stream_generate(model, tokenizer, prompt(0), max_tokens={max_tokens})):
            if n == 3:
                print("generating", flush=True)
        print("finished", flush=True)

    if WHERE == "worker":
        worker = Worker("generator")
        worker.call(generate_for_long)
    else:
        thread = threading.Thread(target=generate_for_long)
        thread.start()
        thread.join()
    print("returned", flush=True)
"""


def _signalled(where: str, signum: int, handler: str, max_tokens: int):
    """Start the program, signal it once it generates; (exit code, seconds to exit, stdout, stderr)."""
    code = _program(SIGNALLED.format(where=where, handler=handler, max_tokens=max_tokens))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONFAULTHANDLER="1")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT)
    try:
        first = child.stdout.readline()  # type: ignore[union-attr]
        assert first == "generating\n", (first, child.communicate(timeout=LIMIT_S))
        time.sleep(0.2)
        child.send_signal(signum)
        signalled = time.monotonic()
        out, err = child.communicate(timeout=LIMIT_S)
        return child.returncode, time.monotonic() - signalled, first + out, err
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"hung: no exit {LIMIT_S} s after the signal\n{out}\n{err}")
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


# The usual exit of each: Python's KeyboardInterrupt (traceback, then it re-raises SIGINT on
# itself), SIGTERM's default action, the program's handler's SystemExit(143).
SIGNALS = {
    "sigint": (signal.SIGINT, "none", -signal.SIGINT, "KeyboardInterrupt"),
    "sigterm": (signal.SIGTERM, "none", -signal.SIGTERM, ""),
    "sigterm_handler": (signal.SIGTERM, "exit", 143, ""),
}


@pytest.mark.parametrize("which", list(SIGNALS))
def test_a_signal_during_a_worker_call_ends_the_process_promptly_with_its_usual_exit(which):
    """Ctrl-C / SIGTERM while the main thread waits in Worker.call() on a 100,000-token generation.

    Before the fix the exit waited 10 s for the operation in flight, then finalized with the
    worker still inside MLX: `terminate called without an active exception`, exit -6, for
    SIGINT and for a SIGTERM handler alike. Now the exit interrupts the operation after 1 s.
    """
    signum, handler, expected, in_stderr = SIGNALS[which]
    code, seconds, out, err = _signalled("worker", signum, handler, max_tokens=100_000)
    assert code == expected and EXIT_ABORT not in err and in_stderr in err, (code, out, err)
    assert "finished" not in out and "returned" not in out, out
    assert seconds < 15, seconds  # measured 0.2 s (SIGTERM) and 1.3 s (exit steps) on the 2-core machine


# Python < 3.13 (bpo-45274): an exception raised in Thread.join() leaves the thread marked
# stopped, so the exit does not wait for it and finalizes while it is inside MLX (-6), with
# or without the shim. The shim interrupts its Workers at exit, not plain threads.
JOIN_INTERRUPTED = pytest.mark.xfail(sys.version_info < (3, 13), strict=True, reason="bpo-45274: exit aborts (-6) "
                                     "while the joined thread is inside MLX, with or without the shim")


@pytest.mark.parametrize("which", [pytest.param("sigint", marks=JOIN_INTERRUPTED), "sigterm",
                                   pytest.param("sigterm_handler", marks=JOIN_INTERRUPTED)])
def test_a_signal_during_a_generate_on_a_thread_ends_the_process_with_its_usual_exit(which):
    """Ctrl-C / SIGTERM while the main thread joins a (non-daemon) thread that generates 3,000 tokens.

    Python waits for a non-daemon thread at exit, so the process should end once the
    generation does (a few seconds), with the signal's usual exit.
    """
    signum, handler, expected, in_stderr = SIGNALS[which]
    code, seconds, out, err = _signalled("thread", signum, handler, max_tokens=3000)
    assert code == expected and EXIT_ABORT not in err and in_stderr in err, (code, out, err)
    assert "returned" not in out, out
    assert seconds < 30, seconds


# ------------------------------------------------------------------ 3. an exception inside a step on the owner


def test_an_exception_in_a_batch_generator_step_on_its_worker_reaches_the_caller_and_the_worker_stays_usable():
    """A BatchGenerator owned by a Worker, stepped from another thread; a logits processor raises.

    The caller gets that very exception (same object, its traceback through the processor);
    the worker then runs other work, and a new generator on it gives the reference tokens.
    """
    out = _run("""
        T = 8
        def run_batch(generator, prompts, **insert):
            uids = generator.insert(prompts, max_tokens=[T] * len(prompts), **insert)
            got = {u: [] for u in uids}
            while True:
                prompt_responses, responses = generator.next()
                if not prompt_responses and not responses:
                    return [got[u] for u in uids]
                for r in responses:
                    got[r.uid].append(int(r.token))
        reference = BatchGenerator(model, max_tokens=T)
        want = run_batch(reference, [prompt(0), prompt(1)])
        reference.close()

        worker = Worker("owner")
        raised, calls = [], []
        def fails_at_the_third_step(context, logits):
            calls.append(1)
            if len(calls) == 3:
                raised.append(KeyError("raised in the step"))
                raise raised[-1]
            return logits
        generator = worker.call(BatchGenerator, model, max_tokens=T)
        caught = {}
        def step_from_another_thread():
            try:
                run_batch(generator, [prompt(0), prompt(1)], logits_processors=[[fails_at_the_third_step], []])
            except BaseException as error:
                import traceback
                caught.update(same=error is raised[0], type=type(error).__name__,
                              frames=[f.name for f in traceback.extract_tb(error.__traceback__)])
        started = time.monotonic()
        on_new_thread(step_from_another_thread)
        seconds = time.monotonic() - started
        still_runs = worker.call(lambda: threading.current_thread().name)
        fresh = worker.call(BatchGenerator, model, max_tokens=T)
        again = on_new_thread(run_batch, fresh, [prompt(0), prompt(1)])
        fresh.close()
        generator.close()
        worker.close()
        print(json.dumps({"caught": caught, "seconds": seconds, "still_runs": still_runs,
                          "again_equal": again == want}))
    """)
    caught = out["caught"]
    assert caught["same"] and caught["type"] == "KeyError", out
    assert "fails_at_the_third_step" in caught["frames"], out
    assert out["seconds"] < 30 and out["still_runs"] == "owner" and out["again_equal"], out


@pytest.mark.xfail(strict=True, reason="mlx-lm's BatchGenerator.next() is not exception-safe: the step that "
                   "raised had advanced every sequence, whose token of that step is lost (with or without the "
                   "shim). Fix (not in the files of this change): the owner patch should refuse further steps "
                   "of a generator whose step raised, with an error saying so")
def test_the_other_sequences_of_a_batch_generator_step_that_raised_keep_every_token():
    out = _run("""
        T = 8
        def step_all(generator, uids, got, bad_uid=None):
            while True:
                try:
                    prompt_responses, responses = generator.next()
                except KeyError:
                    generator.remove([bad_uid])  # the caller drops the failed sequence and carries on
                    continue
                if not prompt_responses and not responses:
                    return
                for r in responses:
                    got[r.uid].append(int(r.token))
        def no_repeats(context, logits):  # a new token every step: a lost one shows
            return logits + mx.zeros(logits.shape[-1]).at[context.reshape(-1)].add(-1e9)
        reference = BatchGenerator(model, max_tokens=T)
        uids = reference.insert([prompt(0), prompt(1)], max_tokens=[T, T], logits_processors=[[], [no_repeats]])
        want = {u: [] for u in uids}
        step_all(reference, uids, want)
        calls = []
        def fails_once(context, logits):
            calls.append(1)
            if len(calls) == 3:
                raise KeyError("raised in the step")
            return logits
        worker = Worker("owner")
        generator = worker.call(BatchGenerator, model, max_tokens=T)
        uids2 = generator.insert([prompt(0), prompt(1)], max_tokens=[T, T],
                                 logits_processors=[[fails_once], [no_repeats]])
        got = {u: [] for u in uids2}
        on_new_thread(step_all, generator, uids2, got, uids2[0])
        print(json.dumps({"survivor": got[uids2[1]], "want": want[uids[1]]}))
    """)
    assert out["survivor"] == out["want"], out


def test_an_exception_in_the_batch_step_reaches_its_caller_as_without_the_batch_mode_and_the_batch_recovers():
    """The batch mode: a caller's logits processor returns None, so the BatchGenerator's own step raises.

    A first caller holds the model alone (paused after two tokens), so the failing call
    goes into a batch. It gets the exception type the same call raises without the batch
    mode; the first caller, not in that batch, goes on and equals the reference; the
    batch's Worker survives, and the calls that follow (8 threads at once) join a batch
    and equal the one-at-a-time reference.
    """
    out = _run("""
        def returns_none(context, logits):
            return None
        def failure():
            try:
                tokens(0, logits_processors=[returns_none])
            except Exception as error:
                return type(error).__name__
            return "no error"
        want = [tokens(i) for i in range(8)]
        without_batch = failure()
        mlx_threadsafe.install(batch=True)
        first, failed_already = [], threading.Event()
        def first_caller():
            for r in stream_generate(model, tokenizer, prompt(1), max_tokens=12):
                first.append(r.token)
                if len(first) == 2:
                    failed_already.wait(30)
        holder = threading.Thread(target=first_caller)
        holder.start()
        wait_until(lambda: len(first) == 2)
        started = time.monotonic()
        with_batch = on_new_thread(failure)
        seconds = time.monotonic() - started
        failed = batching.stats()["failed"]
        failed_already.set()
        holder.join(30)
        results = [None] * 8
        gate = threading.Barrier(8)
        def run(i):
            gate.wait()
            results[i] = tokens(i)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join(30)
        stats = batching.stats()
        print(json.dumps({"without_batch": without_batch, "with_batch": with_batch, "seconds": seconds,
                          "failed": failed, "first": first == want[1], "equal": results == want, "stats": stats}))
    """)
    assert out["with_batch"] == out["without_batch"] == "TypeError", out
    assert out["failed"] == 1 and out["seconds"] < 30, out  # it went through the batch's step, and failed there
    assert out["first"], out
    assert out["equal"] and out["stats"]["max_batch_size"] > 1, out


# ------------------------------------------------------------------ 4. a full queue under 64 callers


def test_a_full_worker_queue_under_64_callers_answers_each_rightly_or_refuses_at_once():
    """64 threads call a Worker (queue_limit=4) whose thread is busy: 4 queue, 60 get WorkerQueueFull.

    Exact outcome: the refusals come at once (while the worker is still busy), the 4
    queued calls return the reference tokens once it is free, no thread is left waiting,
    and the worker then serves the next call.
    """
    out = _run("""
        LIMIT = 4
        want = [tokens(i) for i in range(8)]
        worker = Worker("served", queue_limit=LIMIT)
        busy, release = threading.Event(), threading.Event()
        worker.submit(lambda: (busy.set(), release.wait(30)))
        busy.wait(10)
        outcomes = [None] * 64
        gate = threading.Barrier(64)
        def caller(i):
            gate.wait()
            try:
                outcomes[i] = ("ok", worker.call(tokens, i % 8) == want[i % 8])
            except WorkerQueueFull as error:
                outcomes[i] = ("full", "queue_limit" in str(error))
            except BaseException as error:
                outcomes[i] = ("other", repr(error))
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(64)]
        for t in threads: t.start()
        wait_until(lambda: sum(1 for o in outcomes if o is not None) == 64 - LIMIT)
        refused_while_busy = [o for o in outcomes if o is not None]
        depth = worker.queue_depth
        release.set()
        for t in threads: t.join(30)
        print(json.dumps({"outcomes": outcomes, "refused_while_busy": refused_while_busy, "depth": depth,
                          "alive": sum(t.is_alive() for t in threads), "after": worker.call(tokens, 0) == want[0],
                          "depth_after": worker.queue_depth}))
        worker.close()
    """)
    outcomes = [tuple(o) for o in out["outcomes"]]
    assert out["alive"] == 0, out
    assert outcomes.count(("ok", True)) == 4 and outcomes.count(("full", True)) == 60, outcomes
    assert all(o == ["full", True] for o in out["refused_while_busy"]) and out["depth"] == 4, out
    assert out["after"] and out["depth_after"] == 0, out


# ------------------------------------------------------------------ 5. a thread dies holding a generator

DIES_HOLDING = {
    # A BatchGenerator it built and stepped (its owner is that thread).
    "batch_generator": """
        generator = BatchGenerator(model, max_tokens=100_000)
        generator.insert([prompt(0), prompt(1)], max_tokens=[100_000, 100_000])
        for _ in range(3):
            generator.next()
        held.append(generator)
    """,
    # A stream_generate iterator it started and did not exhaust.
    "stream_generate": """
        iterator = stream_generate(model, tokenizer, prompt(0), max_tokens=100_000)
        next(iterator), next(iterator)
        held.append(iterator)
    """,
    # The same in the batch mode: its sequence stays in the batch its Worker steps.
    "batched_stream_generate": """
        mlx_threadsafe.install(batch=True)
        iterator = stream_generate(model, tokenizer, prompt(0), max_tokens=100_000)
        next(iterator), next(iterator)
        held.append(iterator)
    """,
}


@pytest.mark.parametrize("what", list(DIES_HOLDING))
def test_a_thread_that_dies_holding_a_generator_leaves_a_process_that_exits_0(what):
    """A thread raises while a global still holds its unexhausted generator; the main thread then returns.

    Exit 0 within seconds, the thread's error reported by threading.excepthook, no abort.
    Before the fix the batched case waited 10 s at exit for the batch's Worker (still
    stepping the abandoned sequence), then aborted (-6).
    """
    body = "tokenizer.eos_token_ids = set()\nheld = []\ndef dies():\n" + textwrap.indent(
        textwrap.dedent(DIES_HOLDING[what]), "    ") + "    raise KeyError('the thread died')\n" + """
thread = threading.Thread(target=dies)
thread.start()
thread.join()
print(json.dumps({"held": len(held)}))
"""
    started = time.monotonic()
    done = run_python(_program(body), timeout=LIMIT_S)
    seconds = time.monotonic() - started
    assert done.returncode == 0 and EXIT_ABORT not in done.stderr, (done.returncode, done.stderr)
    assert "KeyError: 'the thread died'" in done.stderr and json.loads(done.stdout)["held"] == 1, done
    assert seconds < 30, seconds


# ------------------------------------------------------------------ 6. a model load that fails halfway

LOAD_FAILS = """
    import pathlib, shutil, tempfile
    broken = pathlib.Path(tempfile.mkdtemp())
    for kind in ("missing_weights", "truncated_file"):
        shutil.copytree(MODEL_PATH, broken / kind)
        weights_file = broken / kind / "model.safetensors"
        if kind == "missing_weights":  # a layer's weights are absent: load() fails after building the model
            weights = mx.load(str(weights_file))
            mx.save_safetensors(str(weights_file), {k: v for k, v in weights.items() if "layers.1." not in k})
        else:  # an interrupted download
            data = weights_file.read_bytes()
            weights_file.write_bytes(data[: len(data) // 2])
    N = 4
    want = [tokens(i) for i in range(N)]
    stop, outputs, errors = threading.Event(), [[] for _ in range(N)], []
    def generate_in_a_loop(i):
        while not stop.is_set() or len(outputs[i]) < 3:
            try:
                outputs[i].append(tokens(i))
            except BaseException as error:
                errors.append(repr(error))
                return
    threads = [threading.Thread(target=generate_in_a_loop, args=(i,)) for i in range(N)]
    for t in threads: t.start()
    wait_until(lambda: all(outputs))
    failures = {}
    def load_broken(kind):
        try:
            load(str(broken / kind))
        except Exception as error:
            return [type(error).__name__, str(error)]
        return None
    for kind in ("missing_weights", "truncated_file"):
        failures[kind] = on_new_thread(load_broken, kind)
    reloaded_model, _ = on_new_thread(load, MODEL_PATH)
    stop.set()
    for t in threads: t.join(30)
    again = [r.token for r in stream_generate(reloaded_model, tokenizer, prompt(0), max_tokens=12)]
    shutil.rmtree(broken)
    print(json.dumps({"failures": failures, "errors": errors, "alive": sum(t.is_alive() for t in threads),
                      "wrong": [(i, o) for i in range(N) for o in outputs[i] if o != want[i]],
                      "generations": sum(map(len, outputs)), "reloaded": again == want[0]}))
"""


def test_a_model_load_that_fails_halfway_on_one_thread_raises_there_and_leaves_the_others_right():
    """Two broken copies of the model load on fresh threads while 4 threads generate.

    The loading thread gets the error it gets without the shim (same type and message:
    ValueError for the missing weights, RuntimeError for the truncated file); every
    generation of the other threads equals the reference; the intact model then loads.
    """
    with_shim = _run(LOAD_FAILS)
    without = _run(LOAD_FAILS, shim=False, exit_abort_allowed=True)
    failures = with_shim["failures"]
    assert failures == without["failures"], (failures, without["failures"])
    assert failures["missing_weights"][0] == "ValueError" and "Missing" in failures["missing_weights"][1], failures
    assert failures["truncated_file"][0] == "RuntimeError" and "corrupt" in failures["truncated_file"][1], failures
    assert with_shim["errors"] == [] and with_shim["alive"] == 0, with_shim
    assert with_shim["wrong"] == [] and with_shim["generations"] >= 12 and with_shim["reloaded"], with_shim
