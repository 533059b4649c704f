"""Tiny random-weight models built offline, for tests, doctor, benchmarks and the plugin.

Each model is a real directory that ``mlx_lm.load(path)`` accepts with no network:
``config.json``, ``model.safetensors`` and a word-level tokenizer made with the
``tokenizers`` library. Nothing is downloaded. Models are cached in the temp dir by
(arch, library versions); several processes may build the same one at once: each
builds into its own folder and renames it into place, and the loser discards its copy.
"""

from __future__ import annotations

import hashlib
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

LORA_CONFIG: Dict[str, Any] = {"fine_tune_type": "lora", "num_layers": 2,
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
    return build_lm_from_config(arch, LM_ARCHS[arch], root=root)


def build_lm_from_config(name: str, config: Dict[str, Any], dtype: Optional[str] = None,
                         root: Optional[Path] = None) -> Path:
    """A random mlx-lm model directory for any config (benchmarks use larger ones); built once.

    `dtype` (e.g. "bfloat16") casts the saved weights; `name` must be unique per config.
    """

    def build(directory: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        model = _random_model(dict(config))
        if dtype is not None:
            model.set_dtype(getattr(mx, dtype))
        mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (directory / "config.json").write_text(json.dumps(dict(config, eos_token_id=EOS_TOKEN_ID), indent=1))
        _save_tokenizer(directory)

    return _build_once(f"lm-{name}" + (f"-{dtype}" if dtype else ""), build, root)


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


# ------------------------------------------------------------------ mlx-vlm

VLM_ARCHS: Dict[str, Dict[str, Any]] = {
    # Loaded through the full mlx_vlm.load(): model and an offline processor.
    "gemma3": {
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "image_token_index": 299,
        "vocab_size": 300, "hidden_size": 64, "eos_token_id": [1],
        "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2,
                        "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16,
                        "num_key_value_heads": 2, "vocab_size": 300, "sliding_window": 8,
                        "sliding_window_pattern": 2, "mm_tokens_per_image": 4, "query_pre_attn_scalar": 16},
        "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 2, "hidden_size": 32,
                          "intermediate_size": 64, "num_attention_heads": 4, "patch_size": 14, "image_size": 56},
    },
    # Loaded with mlx_vlm.utils.load_model (no processor); MRoPE keeps `_rope_deltas` on the model.
    "qwen2_vl": {
        "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 64,
        "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "vocab_size": 300, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": False,
        "image_token_id": 290, "video_token_id": 291, "vision_start_token_id": 288, "vision_end_token_id": 289,
        "eos_token_id": [1],
        "vision_config": {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64,
                          "num_heads": 4, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "mlp_ratio": 2.0},
    },
}


def _random_vlm(config: Dict[str, Any]):
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    model_class, _ = get_model_and_args(config=json.loads(json.dumps(config)))
    filled = json.loads(json.dumps(config))
    for part in ("text_config", "vision_config", "audio_config"):
        filled.setdefault(part, {})
    model_config = model_class.ModelConfig.from_dict(filled)
    model_config = update_module_configs(model_config, model_class, filled,
                                         ["text", "vision", "perceiver", "projector", "audio"])
    mx.random.seed(0)
    model = model_class.Model(model_config)
    mx.eval(model.parameters())
    return model


def _save_gemma3_processor(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<start_of_turn>",
                "<end_of_turn>"]
    tokens = specials + [f"w{i}" for i in range(299 - len(specials))] + ["<image_soft_token>"]  # id 299
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    fast.chat_template = (
        "{% for m in messages %}<start_of_turn> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %} <start_of_image> "
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        " <end_of_turn> {% endfor %}<start_of_turn> ")
    fast.save_pretrained(str(directory))
    import transformers

    # the PIL image processor needs no torch; its name changed across transformers releases
    ImageProcessor = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    ImageProcessor(size={"height": 56, "width": 56}).save_pretrained(str(directory))
    (directory / "processor_config.json").write_text(
        json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": 4}))


def build_vlm(arch: str = "gemma3", root: Optional[Path] = None) -> Path:
    """The directory of a tiny random mlx-vlm model (see VLM_ARCHS); gemma3 comes with a processor."""
    if arch not in VLM_ARCHS:
        raise ValueError(f"unknown VLM arch {arch!r}; choose one of {sorted(VLM_ARCHS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def build(directory: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        model = _random_vlm(VLM_ARCHS[arch])
        mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (directory / "config.json").write_text(json.dumps(VLM_ARCHS[arch], indent=1))
        if arch == "gemma3":
            _save_gemma3_processor(directory)

    # The config's digest is in the key: a changed tiny config must not reuse old weights.
    digest = hashlib.sha256(json.dumps(VLM_ARCHS[arch], sort_keys=True).encode()).hexdigest()[:8]
    return _build_once(f"vlm-{arch}-{digest}-vlm{versions.detect().mlx_vlm}", build, root)
