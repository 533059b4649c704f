"""mlx-vlm scenarios: generate and forward off the loading thread; MRoPE request state."""

from __future__ import annotations

import sys

from ..testing import on_new_thread
from .catalogue import NotApplicable, require, scenario
from .fakes import let_old_releases_generate_on_linux


def _vlm_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


def build_vlm_path(arch: str) -> str:
    """The folder of a tiny offline VLM of `arch`, ready for mlx-vlm's loaders; batch scenarios use it too."""
    from ..testing import build_vlm

    require("mlx_vlm.utils", "update_module_configs")  # the offline builder needs it
    import mlx_vlm  # noqa: F401 - imports the modules whose wired_limit may need the stand-in

    let_old_releases_generate_on_linux(("mlx_vlm.generate", "mlx_vlm.utils"))
    return str(build_vlm(arch))


@scenario("mlx-vlm: load a tiny gemma3 VLM (with processor) on main, generate with an image on a worker")
def vlm_generate_on_worker() -> str:
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(build_vlm_path("gemma3"))
    prompt = apply_chat_template(processor, model.config, "w1 w2", num_images=1)
    image = _vlm_image()

    def run() -> str:
        result = generate(model, processor, prompt, image=[image], max_tokens=4, verbose=False)
        if isinstance(result, tuple):  # 0.1.26 - 0.1.27: (text, timing statistics)
            return result[0]
        return getattr(result, "text", result)

    expected = run()
    got = on_new_thread(run)
    if got != expected:
        raise AssertionError(f"worker gave {got!r}, main gave {expected!r}")
    return repr(got)


@scenario("mlx-vlm: load_model a tiny qwen2_vl on main, forward with an image on a worker")
def vlm_qwen2_vl_forward_on_worker() -> str:
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from mlx_vlm.utils import load_model

    model = load_model(Path(build_vlm_path("qwen2_vl")))
    pixels = np.random.default_rng(0).standard_normal((16, 3 * 2 * 14 * 14)).astype(np.float32)

    def forward():
        ids = mx.array([[5, 288, 290, 290, 290, 290, 289, 7, 8]])
        out = model(ids, pixel_values=mx.array(pixels), image_grid_thw=mx.array([[1, 4, 4]]))
        logits = getattr(out, "logits", out)[0, -1].astype(mx.float32)
        # Evaluate explicitly, as mlx-vlm's own generate does: a thread that only evaluates
        # implicitly (np.array, .item()) is not adopted for its end-of-thread cleanup (a
        # known gap), and the process then aborts at exit in some runs.
        mx.eval(logits)
        return np.array(logits)

    got = on_new_thread(forward)  # first: a forward on main would evaluate lazy state there
    expected = forward()
    if not np.allclose(got, expected, atol=1e-4):
        raise AssertionError("worker logits differ from main-thread logits")
    return "same logits"


def qwen2_vl_requests():
    """A tiny qwen2_vl and requests whose images differ in shape (so their MRoPE deltas differ)."""
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from mlx_vlm.utils import load_model

    model = load_model(Path(build_vlm_path("qwen2_vl")))
    requests = []
    for index, (height, width, words) in enumerate([(4, 4, 2), (8, 4, 3), (4, 8, 1), (8, 8, 2)]):
        image_tokens = height * width // 4  # spatial_merge_size 2
        ids = [5, 288] + [290] * image_tokens + [289] + list(range(7, 7 + words))
        pixels = np.random.default_rng(index).standard_normal((height * width, 3 * 2 * 14 * 14)).astype(np.float32)
        requests.append((mx.array([ids]), mx.array(pixels), mx.array([[1, height, width]])))
    return model, requests


def _vlm_generate_step():
    for name in ("mlx_vlm.generate.ar", "mlx_vlm.generate", "mlx_vlm.utils"):
        module = sys.modules.get(name)
        if module is not None and callable(vars(module).get("generate_step")):
            return vars(module)["generate_step"]
    raise NotApplicable("no generate_step in this release")


def _greedy_steps(model, request, n_tokens: int = 6):
    """The generation of one request, as a generator of token ids."""
    import mlx.core as mx

    ids, pixels, grid = request
    steps = _vlm_generate_step()(ids, model, pixels, mx.ones(ids.shape, dtype=mx.int32), image_grid_thw=grid)
    for _, (token, _) in zip(range(n_tokens), steps):
        yield int(token.item() if hasattr(token, "item") else token)


@scenario("mlx-vlm: qwen2_vl prefill on thread A, decode on thread B (model-held _rope_deltas)")
def vlm_qwen2_vl_prefill_then_decode_elsewhere() -> str:
    model, requests = qwen2_vl_requests()
    expected = list(_greedy_steps(model, requests[1]))
    steps = _greedy_steps(model, requests[1])
    first = on_new_thread(next, steps)
    got = [first] + on_new_thread(list, steps)
    if got != expected:
        raise AssertionError(f"hopping threads gave {got}, one thread gave {expected}")
    return f"{len(got)} tokens equal to the one-thread run"


def _raw_greedy_forwards(model, request, n_decode: int = 4):
    """Prefill with the image, then decode token by token, by calling the model itself."""
    import mlx.core as mx

    make_prompt_cache = require("mlx_vlm.models.cache", "make_prompt_cache")
    ids, pixels, grid = request
    cache = make_prompt_cache(model.language_model)

    def next_token(out):
        token = mx.argmax(getattr(out, "logits", out)[:, -1, :], axis=-1)
        mx.eval(token)
        return token

    def prefill():
        return next_token(model(ids, pixels, mask=None, cache=cache, image_grid_thw=grid))

    def decode(token):
        tokens = []
        for _ in range(n_decode):
            token = next_token(model(token[None], None, mask=None, cache=cache))
            tokens.append(token.item())
        return tokens

    return prefill, decode


@scenario("mlx-vlm: qwen2_vl raw forwards, prefill on thread A and decode on thread B (no generate_step)")
def vlm_qwen2_vl_raw_forwards_prefill_then_decode_elsewhere() -> str:
    model, requests = qwen2_vl_requests()
    prefill, decode = _raw_greedy_forwards(model, requests[1])
    expected = decode(prefill())
    prefill, decode = _raw_greedy_forwards(model, requests[1])
    got = on_new_thread(decode, on_new_thread(prefill))
    if got != expected:
        raise AssertionError(f"hopping threads gave {got}, one thread gave {expected}")
    return f"{len(got)} decoded tokens equal to the one-thread run"


@scenario("mlx-vlm: two qwen2_vl generations interleaved step by step on one model (mlx-vlm #1415)")
def vlm_qwen2_vl_interleaved_requests_keep_their_positions() -> str:
    model, requests = qwen2_vl_requests()
    first, second = requests[0], requests[3]  # 4 and 16 image tokens: different deltas
    expected = [list(_greedy_steps(model, first)), list(_greedy_steps(model, second))]
    a, b = _greedy_steps(model, first), _greedy_steps(model, second)
    got = [[next(a)], [next(b)]]  # both prefills done: the second wrote its positions last
    got[0] += list(a)
    got[1] += list(b)
    if got != expected:
        raise AssertionError(f"interleaved {got} != one after another {expected}")
    return "each generation kept its own positions"


@scenario("mlx-vlm: 4 threads generate on one qwen2_vl at once and match the serial outputs")
def vlm_qwen2_vl_concurrent_requests_match_serial() -> str:
    from concurrent.futures import ThreadPoolExecutor

    model, requests = qwen2_vl_requests()
    serial = [list(_greedy_steps(model, request)) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        threaded = list(pool.map(lambda request: list(_greedy_steps(model, request)), requests))
    if threaded != serial:
        raise AssertionError(f"threaded {threaded} != serial {serial}")
    return f"{len(set(map(tuple, serial)))} distinct outputs, all equal to serial"


