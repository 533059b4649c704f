"""mlx_vlm.load.materialize: a loaded VLM has no lazy state left (all mlx-vlm releases).

mlx-vlm leaves rotary tables lazy (qwen2_vl ``inv_freq``, openai_privacy_filter ``rope._freqs``),
never evaluates LoRA adapters, and ``sharded_load`` leaves the vision tower lazy.
"""

from ..common.load_materialize import LoadMaterializePatch

PATCH = LoadMaterializePatch(id="mlx_vlm.load.materialize", package="mlx-vlm", trigger="mlx_vlm", targets=[
    ("mlx_vlm.utils", "load"),
    ("mlx_vlm.utils", "load_model"),
    ("mlx_vlm.utils", "apply_lora_layers"),
    ("mlx_vlm.trainer.peft.utils", "apply_lora_layers"),
    ("mlx_vlm.trainer.peft.utils", "load_adapters"),
    ("mlx_vlm.trainer.peft.adapter_utils", "load_adapters"),
    ("mlx_vlm.trainer.utils", "apply_lora_layers"),
    ("mlx_vlm.utils", "sharded_load"),
])
