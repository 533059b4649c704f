#!/usr/bin/env bash
# On a CUDA machine with no package registry: the CI subset of releases.toml on mlx for CUDA, as evidence.
#
#   OUT=/some/dir PYTHONPATH=/tmp/site bash compat_matrix/gpu_run.sh [verify options, e.g. --releases ...]
#
# mlx and mlx-cuda must import from PYTHONPATH (default /tmp/site); this repository is added to it. Each
# .gpu-sites/wheels/<package>-<release>/ (compat_matrix/gpu_wheels.sh makes them) is installed with pip
# --no-index --no-deps --target into $SITES/<package>-<release>, then `verify --site-dirs` runs each pair
# (without, then with the shim) on this python, that site first on PYTHONPATH. The records, keyed
# <package>==<release>@mlx<mlx>+cuda and naming the device, go to $OUT/gpu-evidence.json as each pair ends;
# merge them into the evidence where the repository is committed: python -m compat_matrix merge FILE.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/.gpu-sites/out}
SITES=${SITES:-/tmp/gpu-sites}
JOBS=${JOBS:-6}
EXPECT_BACKEND=${EXPECT_BACKEND:-cuda}
export PYTHONPATH=${PYTHONPATH:-/tmp/site}
case ":$PYTHONPATH:" in *":$REPO:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$REPO" ;; esac
mkdir -p "$OUT" "$SITES"

"$PYTHON" - "$EXPECT_BACKEND" <<'PY'
import sys
from mlx_threadsafe import versions
found = versions.detect()
print(f"python {sys.version.split()[0]}; {found.describe()}", flush=True)
if found.backend != sys.argv[1] or found.mlx is None:
    sys.exit(f"expected mlx for {sys.argv[1]} on PYTHONPATH, found {found.describe()}")
PY

for wheels in .gpu-sites/wheels/*/; do
  name=$(basename "$wheels")
  rm -rf "${SITES:?}/$name"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITES/$name" "$wheels"*.whl
done
echo "sites: $(ls "$SITES" | tr '\n' ' ')"

"$PYTHON" -m compat_matrix verify --site-dirs "$SITES" --jobs "$JOBS" --out "$OUT/gpu-evidence.json" "$@" \
  2>&1 | tee "$OUT/gpu-run.log"
