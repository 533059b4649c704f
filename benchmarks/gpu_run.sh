#!/usr/bin/env bash
# On a CUDA machine with no package registry: benchmark sections on the GPU, with carried wheels.
#
#   WHEELS=$HOME/wheels OUT=/some/dir bash benchmarks/gpu_run.sh SECTION ...
#
# $WHEELS holds the Python 3.12 / manylinux_2_35 wheels of mlx, mlx-cuda-13, mlx-lm and wrapt (the
# CUDA wheel is larger than one transfer: carry it in two parts, `split -b 46000000`, and `cat` them
# into the wheel there). They are installed once with pip --no-index --no-deps --target $SITE (kept
# between calls while the machine stays warm); the machine's own numpy, transformers and tokenizers
# serve mlx-lm. Then `python -m benchmarks --device gpu --only SECTION ...`, which merges the
# sections into benchmarks/results/gpu.json; the file is copied to $OUT (bring it back and commit).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$HOME/wheels}
SITE=${SITE:-$HOME/site}
OUT=${OUT:-$REPO/.gpu-sites/out}
mkdir -p "$OUT"

if [ ! -d "$SITE/mlx" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$REPO"
"$PYTHON" -c 'import mlx.core as mx; print(mx.__version__, mx.device_info().get("device_name"))'
"$PYTHON" -m benchmarks --device gpu --only "$@"
cp benchmarks/results/gpu.json "$OUT/gpu.json"
