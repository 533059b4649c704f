"""What programs nobody here wrote do, run without and with the shim (issue: real programs).

First, do no harm: a BatchGenerator whose calls work without the shim works the same
with it (same tokens at temperature 0, its results usable where they were before).
Then the class of bugs the shim now fixes for any module: a stream made at import.
"""

import pytest
from helpers import run_json

SHIM = "\n    import mlx_threadsafe; mlx_threadsafe.install()"

BATCH_THEN_CONTINUE = """
    import json
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import batch_generate
    from mlx_threadsafe.testing import build_lm
    model, tokenizer = load(str(build_lm("llama")))
    result = batch_generate(model, tokenizer, [[1, 5, 6, 7], [1, 8, 9]], max_tokens=4, return_prompt_caches=True)
    try:
        follow_up = [r.token for r in stream_generate(model, tokenizer, [10, 11], prompt_cache=result.caches[0],
                                                      max_tokens=4)]
    except RuntimeError as error:
        follow_up = str(error)
    print(json.dumps([result.texts, follow_up]))
"""


def test_batch_generate_then_continuing_its_cache_works_as_without_the_shim(tiny_models):
    # One thread, public API only: batch_generate's caches continue the conversation.
    without = run_json(BATCH_THEN_CONTINUE, exit_abort_allowed=True)
    with_shim = run_json(SHIM + BATCH_THEN_CONTINUE)
    assert isinstance(without[1], list), without
    assert with_shim == without


SCHEDULER_THREAD = """
    import json, pickle, threading
    import mlx.core as mx
    import mlx_lm.generate as generate_module
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_threadsafe.testing import build_lm
    model, _ = load(str(build_lm("llama")))
    STREAM_KIND = {stream_kind!r}
    box = {{}}

    def scheduler():  # one thread builds the generator and makes every call, as servers do
        if STREAM_KIND == "thread_local":  # mlx-openai-server 1.8.1
            generator = BatchGenerator(model, max_tokens=4, stream=mx.new_thread_local_stream(mx.default_device()))
        else:  # vllm-mlx 0.6.0: its own stream, made the default and repointed into mlx-lm
            stream = mx.new_stream(mx.default_device())
            mx.set_default_stream(stream)
            generate_module.generation_stream = stream
            generator = BatchGenerator(model, max_tokens=4)
        generator.insert([[1, 5, 6, 7], [1, 8, 9]])
        tokens, saved = {{}}, 0
        while len(tokens) < 2 or any(len(t) < 4 for t in tokens.values()):
            for response in generator.next()[1]:
                tokens.setdefault(response.uid, []).append(response.token)
                if response.finish_reason:
                    pickle.dumps(response.prompt_cache)  # the server saves it in its prompt cache
                    saved += 1
        owner = vars(generator).get("_mlx_threadsafe_owner")
        box["out"] = [tokens, saved, owner is None or owner.worker is None]

    thread = threading.Thread(target=scheduler)
    thread.start()
    thread.join()
    print(json.dumps(box.get("out")))
"""


@pytest.mark.parametrize("stream_kind", ["thread_local", "own_concrete"])
def test_a_generator_used_by_the_thread_that_built_it_runs_there_as_without_the_shim(stream_kind, tiny_models):
    code = SCHEDULER_THREAD.format(stream_kind=stream_kind)
    without = run_json(code, exit_abort_allowed=True)
    tokens, saved, direct = run_json(SHIM + code)
    assert without[1] == 2, without
    assert [tokens, saved] == without[:2]
    assert direct, "the shim moved a generator its own thread drives to another thread"


STEPPED_THEN_CALLED_ELSEWHERE = """
    import json, threading
    import mlx_threadsafe
    mlx_threadsafe.install()
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_threadsafe.testing import build_lm
    model, _ = load(str(build_lm("llama")))
    generator = BatchGenerator(model, max_tokens=4)
    generator.insert([[1, 5, 6, 7]])
    generator.next()
    box = {}

    def elsewhere():
        try:
            generator.next()
            box["out"] = "no error"
        except RuntimeError as error:
            box["out"] = [type(error).__name__, str(error)]

    thread = threading.Thread(target=elsewhere, name="request-7")
    thread.start()
    thread.join()
    print(json.dumps(box["out"]))
"""


def test_a_generator_stepped_on_a_live_thread_refuses_another_with_both_names(tiny_models):
    name, message = run_json(STEPPED_THEN_CALLED_ELSEWHERE)
    assert name == "WrongThread"
    assert "'MainThread'" in message and "'request-7'" in message and "Worker" in message


MODULE_STREAM_PROGRAM = """
    import json, sys, threading
    sys.path.insert(0, {folder!r})
    {install_before}
    import server_with_module_stream as server
    {install_after}
    box = {{}}

    def request():
        try:
            box["out"] = server.handle()
        except RuntimeError as error:
            box["out"] = str(error)

    thread = threading.Thread(target=request)
    thread.start()
    thread.join()
    rows = {{}}
    if "mlx_threadsafe" in sys.modules:
        import mlx_threadsafe
        rows["state"] = mlx_threadsafe.status()["mlx.module_streams"].state
        mlx_threadsafe.uninstall()
        rows["restored"] = server.S is server.ORIGINAL and server.default_stream.__defaults__[0] is server.ORIGINAL
    print(json.dumps([box["out"], server.handle(), rows]))
"""

SERVER_MODULE = """
import mlx.core as mx

S = mx.new_stream(mx.default_device())   # module level, at import, on the importing thread
ORIGINAL = S


def default_stream(stream=S):
    return stream


def handle():                            # on a request thread
    with mx.stream(S):
        y = mx.ones(4) * 2
    mx.eval(y)
    return y.tolist()
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_stream_a_module_makes_at_import_works_on_every_thread(when, tmp_path):
    (tmp_path / "server_with_module_stream.py").write_text(SERVER_MODULE)
    shim = "import mlx_threadsafe; mlx_threadsafe.install()"
    program = MODULE_STREAM_PROGRAM.format(
        folder=str(tmp_path), install_before=shim if when == "before" else "",
        install_after=shim if when == "after" else "")
    without = run_json(MODULE_STREAM_PROGRAM.format(folder=str(tmp_path), install_before="", install_after=""),
                       exit_abort_allowed=True)
    assert "There is no Stream" in without[0], without
    on_thread, on_main, rows = run_json(program)
    assert on_thread == on_main == [2.0, 2.0, 2.0, 2.0]
    assert rows == {"state": "applied", "restored": True}


def test_the_module_stream_patch_is_disabled_by_name(tmp_path):
    (tmp_path / "server_with_module_stream.py").write_text(SERVER_MODULE)
    program = MODULE_STREAM_PROGRAM.format(folder=str(tmp_path), install_before=SHIM, install_after="")
    on_thread, _, rows = run_json(program, env={"MLX_THREADSAFE_DISABLE": "mlx.module_streams"})
    assert "There is no Stream" in on_thread and rows["state"] == "disabled"


def test_what_a_worker_returns_is_evaluated_before_it_is_handed_back():
    out = run_json("""
        import json
        from concurrent.futures import ThreadPoolExecutor
        import mlx.core as mx
        from mlx_threadsafe import Worker

        def lazy_result():
            return {"logits": mx.ones(4) * 3, "caches": [mx.arange(3) + 1]}

        def use(result):
            try:
                return [(result["logits"] + 1).tolist(), result["caches"][0].tolist()]
            except RuntimeError as error:
                return str(error)

        with ThreadPoolExecutor(1) as pool:
            plain = use(pool.submit(lazy_result).result())
        with Worker("owner") as worker:
            handed_over = use(worker.call(lazy_result))
        print(json.dumps([plain, handed_over]))
    """)
    plain, handed_over = out
    assert "There is no Stream" in plain  # a plain thread pool hands back lazy work
    assert handed_over == [[4.0, 4.0, 4.0, 4.0], [1, 2, 3]]
