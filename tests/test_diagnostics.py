"""Errors that name their threads and the fix; a forked child that refuses MLX instead of hanging."""

import subprocess
import sys

from helpers import ROOT, run_json

CROSSED_STREAM = """
    import json, threading
    {install}
    import mlx.core as mx
    box = {{}}

    def build():
        stream = mx.new_stream(mx.default_device())
        with mx.stream(stream):
            box["y"] = mx.ones(4) * 2

    thread = threading.Thread(target=build, name="builder")
    thread.start()
    thread.join()
    try:
        mx.eval(box["y"])
        print(json.dumps(None))
    except RuntimeError as error:
        print(json.dumps([type(error).__name__, str(error), getattr(error, "__notes__", [])]))
"""


def test_a_lazy_array_evaluated_on_another_thread_names_both_threads_and_the_fix():
    name, message, notes = run_json(CROSSED_STREAM.format(install="import mlx_threadsafe; mlx_threadsafe.install()"))
    assert name == "RuntimeError" and "There is no Stream(cpu" in message  # type and text as MLX made them
    [note] = notes
    assert "made by thread 'builder' (it has ended)" in note and "used on thread 'MainThread'" in note
    assert "mlx_threadsafe.materialize" in note and "Worker" in note and "lazy=False" in note


def test_without_the_shim_the_same_error_says_nothing_of_threads():
    name, message, notes = run_json(CROSSED_STREAM.format(install=""))
    assert name == "RuntimeError" and "There is no Stream(cpu" in message and notes == []


UNHANDLED_IN_A_THREAD = """
    import json, threading
    {install}
    import mlx.core as mx
    box, notes = {{}}, []
    threading.excepthook = (lambda report, original=threading.excepthook:  # reads the notes once printed
                            original(report) or notes.extend(getattr(report.exc_value, "__notes__", [])))

    def build():
        with mx.stream(mx.new_stream(mx.default_device())):
            box["y"] = mx.ones(4) * 2

    def use():  # async_eval and item(): the per-token calls the shim does not wrap
        mx.async_eval(box["y"])
        box["y"].item()

    for target, name in ((build, "builder"), (use, "request-1")):
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()
    print(json.dumps(notes))
"""


def test_a_thread_error_that_ends_a_thread_unhandled_is_explained_in_its_report():
    # The note is added by the shim's excepthook, whichever call raised: here async_eval.
    install = "import mlx_threadsafe; mlx_threadsafe.install()"
    [note] = run_json(UNHANDLED_IN_A_THREAD.format(install=install))
    assert "made by thread 'builder' (it has ended)" in note and "used on thread 'request-1'" in note
    assert run_json(UNHANDLED_IN_A_THREAD.format(install="")) == []


def test_uninstall_leaves_an_excepthook_set_after_install_in_place():
    out = run_json("""
        import json, sys, threading
        import mlx_threadsafe
        original = threading.excepthook
        mlx_threadsafe.install()
        import mlx.core
        wrapped = threading.excepthook
        def servers_own(report):
            pass
        threading.excepthook = servers_own
        mlx_threadsafe.uninstall()
        kept = threading.excepthook is servers_own
        threading.excepthook = original
        mlx_threadsafe.install(); mlx_threadsafe.uninstall()  # nobody else's: the original comes back
        print(json.dumps([wrapped is not original, kept, threading.excepthook is original,
                          sys.excepthook is sys.__excepthook__]))
    """)
    assert out == [True, True, True, True]


def test_an_error_inside_a_worker_call_names_the_threads_too():
    out = run_json("""
        import json, threading
        import mlx_threadsafe
        mlx_threadsafe.install()
        import mlx.core as mx
        box, built, done = {}, threading.Event(), threading.Event()

        def request():  # stays alive while the worker tries its lazy array
            with mx.stream(mx.new_stream(mx.default_device())):
                box["y"] = mx.ones(4) * 2
            built.set()
            done.wait(60)

        thread = threading.Thread(target=request, name="request-3")
        thread.start()
        built.wait(60)
        with mlx_threadsafe.Worker("model-owner") as worker:
            try:
                worker.call(mx.eval, box["y"])
                print(json.dumps("no error"))
            except RuntimeError as error:
                print(json.dumps(getattr(error, "__notes__", [])))
        done.set()
        thread.join()
    """)
    [note] = out
    assert "made by thread 'request-3'" in note and "used on thread 'model-owner'" in note


FORK_AFTER_USE = """
import json, multiprocessing, sys
{install}
import mlx.core as mx

mx.eval(mx.ones(4) * 2)  # the parent uses MLX
parent_array = mx.ones(3)
mx.eval(parent_array)
{worker}


def child(queue):
    results = []
    for name, call in [("new work", lambda: (mx.ones((4,)) * 3).tolist()),
                       ("parent's array", lambda: parent_array.tolist()),
                       ("parent's worker", lambda: WORKER.call(int, 1) if WORKER else None)]:
        try:
            results.append([name, "returned", repr(call())])
        except Exception as error:
            results.append([name, type(error).__name__, str(error)])
    queue.put(results)


if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(15)
    hung = process.is_alive()
    if hung:
        process.kill()
    print(json.dumps({{"hung": hung, "results": None if hung else queue.get(timeout=5)}}))
"""


def _fork_program(tmp_path, shim: bool) -> dict:
    script = tmp_path / "fork_after_use.py"
    script.write_text(FORK_AFTER_USE.format(
        install="import mlx_threadsafe; mlx_threadsafe.install()" if shim else "",
        worker="WORKER = mlx_threadsafe.Worker('parent-worker')" if shim else "WORKER = None"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_child_forked_after_mlx_use_hangs_without_the_shim(tmp_path):
    assert _fork_program(tmp_path, shim=False)["hung"] is True


def test_a_child_forked_after_mlx_use_gets_a_clear_error_with_the_shim(tmp_path):
    out = _fork_program(tmp_path, shim=True)
    assert out["hung"] is False
    for name, kind, message in out["results"]:
        assert kind == "ForkedAfterMlxUse", (name, kind, message)
        assert "forked after MLX was used" in message and "'spawn'" in message


def test_status_says_what_protection_this_platform_gets():
    out = run_json("""
        import json, mlx_threadsafe
        status = mlx_threadsafe.install()
        print(json.dumps([status.protection, str(status)]))
    """)
    rows, table = out
    subjects = [subject for subject, _ in rows]
    assert subjects[0].startswith("streams (cpu, mlx") and subjects[1:] == ["thread end", "exit wait", "fork"]
    assert "bound to the thread" in rows[0][1] and "Linux /proc" in rows[2][1] and "spawn" in rows[3][1]
    assert "protection on this platform:" in table


COLLECTIVES_FROM_TWO_THREADS = """
    import json, threading
    {install}
    import mlx.core as mx
    group = mx.distributed.init()  # one rank here: the guard does not depend on the peers
    pending = mx.distributed.all_sum(mx.array([1.0]))  # issued on the main thread, not evaluated yet
    box = {{}}

    def second():
        try:
            box["out"] = mx.distributed.all_sum(mx.array([2.0])).tolist()
        except RuntimeError as error:
            box["out"] = [type(error).__name__, str(error)]

    thread = threading.Thread(target=second, name="request-2")
    thread.start()
    thread.join()
    mx.eval(pending)  # evaluated: another thread may issue collectives now
    thread = threading.Thread(target=lambda: box.update(after=mx.distributed.all_sum(mx.array([3.0])).tolist()))
    thread.start()
    thread.join()
    print(json.dumps([box["out"], box["after"]]))
"""


def test_a_collective_from_a_second_thread_while_one_is_pending_is_refused_with_both_names():
    (name, message), after = run_json(COLLECTIVES_FROM_TWO_THREADS.format(
        install="import mlx_threadsafe; mlx_threadsafe.install()"))
    assert name == "ConcurrentCollectives"
    assert "thread 'request-2' issued mx.distributed.all_sum" in message and "'MainThread'" in message
    assert "one thread" in message and after == [3.0]


def test_without_the_shim_the_second_thread_issues_it_silently():
    out = run_json(COLLECTIVES_FROM_TWO_THREADS.format(install=""))
    assert out == [[2.0], [3.0]]  # no error: on a real ring the pairing across ranks goes wrong
