"""Tiny random-weight models built offline, for tests, doctor, benchmarks and the plugin.

Each model is a real directory that ``mlx_lm.load(path)`` accepts with no network:
``config.json``, ``model.safetensors`` and a word-level tokenizer made with the
``tokenizers`` library. Nothing is downloaded. Models are cached in the temp dir by
(arch, library versions); several processes may build the same one at once: each
builds into its own folder and renames it into place, and the loser discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from . import versions

VOCAB = 300
EOS_TOKEN_ID = 2
_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)

LM_ARCHS: Dict[str, Dict[str, Any]] = {
    "llama": dict(_COMMON, model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0),
    # llama3 rope_scaling: Llama3RoPE keeps a lazy private `_freqs` after load.
    "llama3rope": dict(
        _COMMON, model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # A sliding window makes mlx-lm use RotatingKVCache (mlx-lm #1256).
    "gemma3_text": dict(
        _COMMON, model_type="gemma3_text", num_hidden_layers=4, head_dim=16, rms_norm_eps=1e-6,
        sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16, max_position_embeddings=512,
    ),
    "qwen3": dict(_COMMON, model_type="qwen3", head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=512),
}

LORA_CONFIG = {"fine_tune_type": "lora", "num_layers": 2,
               "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}

PROMPT = "w1 w2 w3 w4"


def on_new_thread(fn: Callable, *args, **kwargs):
    """Run `fn` on a fresh thread and return its result, re-raising its exception here."""
    box: Dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = error

    thread = threading.Thread(target=run, name=f"on-new-thread-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def cache_root() -> Path:
    return Path(os.environ.get("MLX_THREADSAFE_MODEL_CACHE") or Path(tempfile.gettempdir()) / "mlx_threadsafe-models")


def _cache_key(kind: str) -> str:
    env = versions.detect()
    return f"{kind}-mlx{env.mlx}-lm{env.mlx_lm}"


def _build_once(kind: str, build, root: Optional[Path]) -> Path:
    root = Path(root) if root is not None else cache_root()
    final = root / _cache_key(kind)
    if (final / "config.json").exists() or (final / "adapter_config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not final.exists():
                raise  # a real failure, not another process winning the race
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _save_tokenizer(directory: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(directory))


def _random_model(config: Dict[str, Any]):
    import importlib

    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)  # the same weights in every process, so outputs compare across runs
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def build_lm(arch: str = "llama", root: Optional[Path] = None) -> Path:
    """The directory of a tiny random mlx-lm model of `arch` (see LM_ARCHS); built once."""
    if arch not in LM_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(LM_ARCHS)}")

    def build(directory: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        config = dict(LM_ARCHS[arch])
        model = _random_model(config)
        mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (directory / "config.json").write_text(json.dumps(dict(config, eos_token_id=EOS_TOKEN_ID), indent=1))
        _save_tokenizer(directory)

    return _build_once(f"lm-{arch}", build, root)


def build_lora_adapter(arch: str = "llama", root: Optional[Path] = None) -> Path:
    """A LoRA adapter directory for the tiny `arch` model (``load(path, adapter_path=...)``)."""

    def build(directory: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = _random_model(dict(LM_ARCHS[arch]))
        model.freeze()
        linear_to_lora_layers(model, LORA_CONFIG["num_layers"], LORA_CONFIG["lora_parameters"])
        # LoRA's B starts at zero; random B makes the adapter change the outputs.
        adapters = tree_map(lambda a: mx.random.normal(a.shape) * 0.05, model.trainable_parameters())
        mx.save_safetensors(str(directory / "adapters.safetensors"), dict(tree_flatten(adapters)))
        (directory / "adapter_config.json").write_text(json.dumps(LORA_CONFIG, indent=1))

    return _build_once(f"lora-{arch}", build, root)
