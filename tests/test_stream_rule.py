"""The stream rule: a stream made on one thread works when another thread enters it, wherever it is held.

Every program runs in a fresh interpreter, without the shim and with it (installed before
and after mlx is imported).
"""

import re

import pytest
from helpers import run_json, run_python

PLACES = """
    import json, queue, sys, threading
    {install_before}
    import mlx.core as mx

    class Engine:
        STREAM = mx.new_stream(mx.default_device())          # a class attribute, at import

    STREAMS = {{"gen": mx.new_stream(mx.default_device())}}   # a container, at import
    MODULE_STREAM = mx.new_stream(mx.default_device())       # a module global, at import

    class Loader:                                            # prefetches on a thread, self.stream from __init__
        def __init__(self):
            self.stream = mx.new_stream(mx.default_device())
            self.batches = queue.Queue()

        def prefetch(self):
            with mx.stream(self.stream):
                batch = mx.arange(4) * 3
            mx.eval(batch)
            self.batches.put(batch.tolist())

    {install_after}

    def double_on(stream):
        with mx.stream(stream):
            y = mx.ones(4) * 2
        mx.eval(y)
        return y.tolist()

    def plus_one_by_default(stream):
        mx.set_default_stream(stream)
        y = mx.ones(2) + 1
        mx.eval(y)
        return y.tolist()

    def on_thread(fn, *args):
        box = {{}}
        def run():
            try:
                box["out"] = fn(*args)
            except RuntimeError as error:
                box["out"] = str(error).splitlines()[0]
        thread = threading.Thread(target=run, name="req-worker-7")
        thread.start()
        thread.join()
        return box["out"]

    def main():
        made_in_main = mx.new_stream(mx.default_device())
        engine = type("Engine", (), {{}})()
        engine.stream = mx.new_stream(mx.default_device())
        out = {{where: on_thread(double_on, stream) for where, stream in [
            ("module global", MODULE_STREAM), ("class attribute", Engine.STREAM), ("container", STREAMS["gen"]),
            ("instance attribute", engine.stream), ("made in main()", made_in_main),
            ("the main thread's default stream", mx.default_stream(mx.default_device()))]}}
        out["set_default_stream"] = on_thread(plus_one_by_default, made_in_main)
        loader = Loader()
        threading.excepthook = lambda args: None   # without the shim the prefetch thread raises
        prefetching = threading.Thread(target=loader.prefetch)
        prefetching.start()
        prefetching.join()
        out["data loader"] = loader.batches.get() if not loader.batches.empty() else "nothing prefetched"
        print(json.dumps(out))

    main()
"""
SHIM = "import mlx_threadsafe; mlx_threadsafe.install()"


def _places(install_before: str = "", install_after: str = "", **kwargs):
    code = PLACES.format(install_before=install_before, install_after=install_after)
    return run_json(code, exit_abort_allowed=not (install_before or install_after), **kwargs)


@pytest.fixture(scope="module")
def without_shim():
    return _places()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_stream_entered_on_another_thread_works_wherever_it_is_held(when, without_shim):
    installed = _places(**{f"install_{when}": SHIM})
    expected = {where: [2.0, 2.0, 2.0, 2.0] for where in without_shim}
    expected.update({"set_default_stream": [2.0, 2.0], "data loader": [0, 3, 6, 9]})
    assert installed == expected
    failures = dict(without_shim)
    assert failures.pop("data loader") == "nothing prefetched"
    assert all("There is no Stream" in out for out in failures.values()), without_shim


def test_the_rule_is_off_when_its_patch_is_disabled(without_shim):
    disabled = _places(install_before=SHIM, env={"MLX_THREADSAFE_DISABLE": "mlx.module_streams"})
    assert _without_indices(disabled) == _without_indices(without_shim)


def _without_indices(outcomes):
    # Stream indices count every stream made in the process, the shim's records included.
    return {where: re.sub(r"Stream\(cpu, \d+\)", "Stream(cpu, N)", str(out)) for where, out in outcomes.items()}


OWN_THREAD = """
    import json, threading
    import mlx_threadsafe
    mlx_threadsafe.install()
    import mlx.core as mx

    S = mx.new_stream(mx.default_device())
    ORIGINAL = S
    device = mx.default_device()
    with mx.stream(S):
        entered_itself = mx.default_stream(device) == S
        y = mx.ones(3) * 2
    mx.eval(y)
    mx.set_default_stream(S)
    set_itself = mx.default_stream(device) == S

    def on_thread():
        with mx.stream(S):
            twin = mx.default_stream(device)
            z = mx.ones(3) * 5
        mx.async_eval(z)
        mx.synchronize(S)            # waits for this thread's work on S too
        return [twin == S, type(twin) is mx.Stream, str(twin.device) == str(S.device), z.tolist()]

    box = {}
    thread = threading.Thread(target=lambda: box.update(out=on_thread()))
    thread.start()
    thread.join()
    print(json.dumps([type(S).__name__, S is ORIGINAL, entered_itself, set_itself, y.tolist(), box["out"]]))
"""


def test_on_its_own_thread_a_program_sees_the_stream_it_made():
    kind, same_object, entered_itself, set_itself, computed, elsewhere = run_json(OWN_THREAD)
    assert [kind, same_object, entered_itself, set_itself, computed] == ["Stream", True, True, True, [2.0] * 3]
    # Another thread gets a stream of its own on the same device, not the original.
    assert elsewhere == [False, True, True, [5.0] * 3]


NOTES = """
    import json, threading
    import mlx_threadsafe
    mlx_threadsafe.install()
    import mlx.core as mx

    made = mx.new_stream(mx.default_device())
    lazy = mx.ones(3) * 2          # lazy, on the main thread's default stream

    def notes_of(fn, name):
        box = {"notes": "no error"}
        def run():
            try:
                fn()
            except RuntimeError as error:
                box["notes"] = getattr(error, "__notes__", [])
        thread = threading.Thread(target=run, name=name)
        thread.start()
        thread.join()
        return box["notes"]

    print(json.dumps([notes_of(lambda: mx.eval(lazy), "req-worker-7"),
                      notes_of(lambda: mx.eval(mx.ones(2, stream=made)), "req-worker-8")]))
"""


def test_thread_errors_name_the_thread_that_made_the_stream_and_the_way_out():
    lazy_notes, argument_notes = run_json(NOTES)
    assert len(lazy_notes) == 1 and "default stream of thread 'MainThread'" in lazy_notes[0]
    assert "used on thread 'req-worker-7'" in lazy_notes[0]
    # stream= on an op is not remapped (no per-op cost): the note says how to enter it instead.
    assert len(argument_notes) == 1 and "made by thread 'MainThread'" in argument_notes[0]
    assert "'req-worker-8'" in argument_notes[0] and "with mx.stream(s)" in argument_notes[0]


FOREIGN_GLOBALS = """
    import sys, types, warnings
    {install}

    class Deprecated:                      # like torch.distributed.reduce_op
        @property
        def __class__(self):
            warnings.warn("reduce_op is deprecated", FutureWarning)
            return Deprecated

    class LazyProxy:                       # like a lazy module proxy: any attribute read imports or fails
        def __getattribute__(self, name):
            raise RuntimeError(f"the shim read {{name}} of a lazy proxy")

    holder = types.ModuleType("holder_of_foreign_objects")
    holder.reduce_op = Deprecated()
    holder.proxy = LazyProxy()
    sys.modules["holder_of_foreign_objects"] = holder
    sys.modules["a_lazy_module"] = LazyProxy()

    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_threadsafe.testing import PROMPT, build_lm, on_new_thread
    model, tokenizer = load(str(build_lm("llama")))
    elsewhere = on_new_thread(generate, model, tokenizer, PROMPT, max_tokens=3)
    print(elsewhere == generate(model, tokenizer, PROMPT, max_tokens=3))
"""


def test_the_shim_calls_nothing_in_objects_it_does_not_own(tiny_models):
    without = run_python(FOREIGN_GLOBALS.format(install=""))
    installed = run_python(FOREIGN_GLOBALS.format(install=SHIM), env={"PYTHONWARNINGS": "always"})
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout == without.stdout == "True\n"
    assert installed.stderr == without.stderr == ""
