"""Smoke: init the ring, one all_sum, report rank/size, the env and whether the shim is on."""
import json
import os
import sys

if "--install" in sys.argv:
    import mlx_threadsafe

    mlx_threadsafe.install()

import mlx.core as mx

group = mx.distributed.init(strict=True, backend="ring")
total = mx.distributed.all_sum(mx.array(float(group.rank() + 1)), group=group).item()
installed = False
if "mlx_threadsafe" in sys.modules:
    installed = sys.modules["mlx_threadsafe"].is_installed()
print(json.dumps({"rank": group.rank(), "size": group.size(), "sum": total,
                  "env_MLX_RANK": os.environ.get("MLX_RANK"), "env_MLX_THREADSAFE": os.environ.get("MLX_THREADSAFE"),
                  "shim_installed": installed}), flush=True)
