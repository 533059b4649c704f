"""The Worker contract, one behaviour per test (after Emily's worker_lifecycle_test.exs)."""

import asyncio
import gc
import threading
import time
import weakref

import pytest

from mlx_threadsafe import Worker, WorkerClosed, WorkerQueueFull


def blocker():
    """A job that holds the worker until released, and an event set once it is running."""
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        release.wait(10)
        return "in-flight done"

    return job, started, release


def test_a_worker_rejects_a_non_positive_queue_limit():
    with pytest.raises(ValueError, match="queue_limit"):
        Worker(queue_limit=0)


def test_an_idle_worker_has_queue_depth_zero_and_a_name():
    with Worker("idle") as worker:
        assert worker.queue_depth == 0 and worker.name == "idle" and worker.is_alive


def test_work_runs_on_the_worker_thread_which_owns_its_own_stream():
    import mlx.core as mx

    with Worker("owner") as worker:
        ran_on = worker.call(lambda: threading.current_thread().name)
        value = worker.call(lambda: (mx.arange(4) * 2).tolist())
    assert ran_on == "owner" and value == [0, 2, 4, 6]
    assert worker.stream is not None


def test_submit_returns_a_future_of_the_result():
    with Worker() as worker:
        assert worker.submit(lambda a, b=0: a + b, 2, b=3).result(5) == 5


def test_call_reraises_the_original_exception_with_its_traceback():
    def fails():
        raise KeyError("from the worker")

    with Worker() as worker:
        with pytest.raises(KeyError, match="from the worker") as caught:
            worker.call(fails)
    assert any(frame.name == "fails" for frame in caught.traceback)


def test_acall_is_awaitable_from_asyncio():
    with Worker() as worker:
        assert asyncio.run(worker.acall(lambda: threading.current_thread().name)) == worker.name


def test_a_call_from_the_worker_itself_runs_inline_without_deadlock():
    with Worker() as worker:
        assert worker.call(lambda: worker.call(lambda: "nested")) == "nested"


def test_the_queue_applies_back_pressure_when_full():
    job, started, release = blocker()
    worker = Worker(queue_limit=2)
    worker.submit(job)
    started.wait(5)
    worker.submit(lambda: 1)
    worker.submit(lambda: 2)
    with pytest.raises(WorkerQueueFull, match="2 operations queued"):
        worker.submit(lambda: 3)
    release.set()
    worker.close()


def test_stopping_a_worker_cancels_queued_ops_and_never_hangs():
    job, started, release = blocker()
    worker = Worker()
    in_flight = worker.submit(job)
    started.wait(5)
    queued = [worker.submit(lambda i=i: i) for i in range(5)]
    closer = threading.Thread(target=worker.close)
    closer.start()
    for future in queued:
        with pytest.raises(WorkerClosed, match="closed before running"):
            future.result(5)
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert in_flight.result(5) == "in-flight done"  # the operation in flight finishes
    assert not worker.thread.is_alive()


def test_close_is_idempotent_and_later_use_raises():
    worker = Worker("done")
    worker.close()
    worker.close()
    with pytest.raises(WorkerClosed, match="'done' is closed"):
        worker.submit(lambda: 1)
    with pytest.raises(WorkerClosed):
        worker.call(lambda: 1)
    assert not worker.is_alive


def test_close_from_inside_the_worker_does_not_deadlock():
    worker = Worker()
    worker.call(worker.close)
    worker.thread.join(5)
    assert not worker.thread.is_alive()


def test_close_runs_teardown_on_the_worker_thread():
    worker = Worker("tears-down")
    seen = []
    worker.close(teardown=lambda: seen.append(threading.current_thread().name))
    assert seen == ["tears-down"]


def test_a_teardown_given_to_an_already_closed_worker_is_reported_not_dropped():
    from mlx_threadsafe import MlxThreadsafeWarning

    worker = Worker()
    worker.close()
    ran = []
    with pytest.warns(MlxThreadsafeWarning, match="already closed; teardown .* was not run"):
        worker.close(teardown=lambda: ran.append(True))
    assert ran == []


def test_an_unreferenced_worker_is_stopped_when_collected():
    worker = Worker()
    thread = worker.thread
    reference = weakref.ref(worker)
    del worker
    gc.collect()
    assert reference() is None
    thread.join(5)
    assert not thread.is_alive()


def test_a_finite_await_timeout_raises_a_timeout_naming_the_operation():
    job, started, release = blocker()
    worker = Worker(await_timeout=0.2)
    worker.submit(job)
    started.wait(5)

    def slow_operation():
        return 1

    begun = time.monotonic()
    with pytest.raises(TimeoutError, match="slow_operation"):
        worker.call(slow_operation)
    assert time.monotonic() - begun < 5
    release.set()
    worker.close()
