#!/usr/bin/env bash
# Here (a machine with PyPI): the wheels compat_matrix/gpu_run.sh installs on a GPU machine that has no
# package registry, one folder per release of the CI subset: .gpu-sites/wheels/<package>-<release>/ holds
# the release and the pins it needs next to what that machine already has (Python 3.12 with transformers
# 5.17, tokenizers 0.23, huggingface_hub 1.33, numpy 2.5, torch and the rest).
# Every release of the CI subset runs its scenarios on those versions as they are (tried in a Python 3.12
# venv of the same versions, without torch, on mlx for the CPU: the verdicts of the uv venvs), so no release
# needs a pin; each folder carries wrapt 2.5.2, the wrapt the CPU evidence ran with, so that the shim runs
# on the same wrapt there. mlx and mlx-cuda are carried separately (on PYTHONPATH there).
# .gpu-sites/ is ignored (.git/info/exclude); keep it under 40 MiB (one transfer is at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DOWNLOAD=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
COMMON=("wrapt==2.5.2")
# Extra pins by release ("package==release" -> requirements separated by spaces); none needed so far.
declare -A PINS=()
releases=$("$PYTHON" -c 'import tomllib; print(" ".join(tomllib.load(open("compat_matrix/releases.toml", "rb"))["ci"]))')
for release in $releases; do
  folder=".gpu-sites/wheels/${release/==/-}"
  rm -rf "$folder" && mkdir -p "$folder"
  # shellcheck disable=SC2086
  "$PYTHON" "${DOWNLOAD[@]}" -d "$folder" "$release" "${COMMON[@]}" ${PINS[$release]:-}
  echo "$folder: $(cd "$folder" && ls | tr '\n' ' ')"
done
du -sh .gpu-sites
