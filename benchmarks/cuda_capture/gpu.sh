#!/usr/bin/env bash
# Issue 29 on the lent H200 (no package index there). Wheels as benchmarks/gpu_run.sh carries them:
# mlx-cuda-13 0.32.4 split in two (`split -b 46000000`), part 00 left in /root/whl by a first call,
# part 01 and the mlx, mlx-lm and wrapt wheels carried in .whl/b by this one.
#   bash benchmarks/cuda_capture/gpu.sh stage1   # install; cost ABBA; rates no_shim / shim
#   bash benchmarks/cuda_capture/gpu.sh stage2   # diagnostics and top-ups (machine still warm)
#   bash benchmarks/cuda_capture/gpu.sh sweep|gate_rates|gate_cost   # mlx.cuda_capture_gate: evidence, rates, cost
#   bash benchmarks/cuda_capture/gpu.sh sigfpe   # the SIGFPE: 8 threads cold against warmed by one generation first
#   bash benchmarks/cuda_capture/gpu.sh per_token|batch_mode   # one thread's cost; the batch mode (issue 30)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
START=$(date +%s)
OUT=${OUT:-/tmp/cc_out}
RES=/root/cc  # kept between calls while the machine stays warm; copied to $OUT at the end
mkdir -p "$OUT" "$RES" /root/whl
trap 'cp "$RES"/*.json "$OUT"/ 2>/dev/null' EXIT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site:$REPO MLX_THREADSAFE_MODEL_CACHE=/root/models HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
left() { echo $(( $1 - ($(date +%s) - START) )); }
if [ ! -d /tmp/site/mlx ]; then
  cat /root/whl/cuda.part00 "${WHEELS_B:-.whl/b}"/cuda.part01 > /root/whl/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  cp "${WHEELS_B:-.whl/b}"/*.whl /root/whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target /tmp/site /root/whl/*.whl || exit 1
fi
nvidia-smi | head -15
python3 -c 'import mlx.core as mx, mlx_lm; print(mx.__version__, mlx_lm.__version__, mx.default_device(), mx.device_info().get("device_name"))'
case "$1" in
  stage1)
    python3 -c 'from benchmarks.cuda_capture.run import _model_dir, _wide_dir; print(_model_dir("qwen3"), _wide_dir())'
    echo "setup took $(( $(date +%s) - START )) s"
    timeout 200 python3 -m benchmarks.cuda_capture.run cost --out "$RES/cost.json" --pairs 2
    echo "cost done at $(( $(date +%s) - START )) s"
    python3 -m benchmarks.cuda_capture.run rates --out "$RES/rates.json" --runs no_shim=60 shim_graphs_off=60 \
      --parallel 8 --deadline "$(left 530)"
    ;;
  stage2)
    python3 -m benchmarks.cuda_capture.run rates --out "$RES/rates.json" --runs ${RUNS:-shim=25 no_shim_load_barrier=25 no_shim_both_barriers=25} \
      --parallel 8 --deadline "$(left ${BUDGET:-300})"
    ;;
  sweep)  # the CI subset of releases with the gate on: the sweep that found the handoff hang
    mkdir -p "$RES/sweep"
    MLX_THREADSAFE_CUDA_GATE=on OUT="$RES/sweep" JOBS=${JOBS:-8} timeout "${BUDGET:-540}" \
      bash compat_matrix/gpu_run.sh || echo "gpu_run.sh exited $?"
    cp "$RES"/sweep/* "$OUT"/ 2>/dev/null
    ;;
  gate_rates)
    python3 -m benchmarks.cuda_capture.run rates --out "$RES/rates-gate-3.json" --runs ${RUNS:-shim_gate=64 no_shim=64} \
      --parallel 8 --deadline "$(left ${BUDGET:-480})"
    ;;
  sigfpe)  # is the SIGFPE the race at a compiled kernel's first use? (RESULTS.md): warm-first should remove it
    python3 -m benchmarks.cuda_capture.run rates --out "$RES/rates-sigfpe.json" \
      --runs ${RUNS:-no_shim=64 no_shim_warm_first=64 shim=64 shim_warm_first=64} \
      --parallel 8 --deadline "$(left ${BUDGET:-480})"
    ;;
  per_token)  # one thread's cost: the whole shim on tiny and wide, then (falling through) the gate alone, 32 pairs
    for model in tiny wide-gpu; do
      timeout 200 python3 -m benchmarks.measure generation --model $model --device gpu > "$RES/generation-$model.json"
      tail -c 300 "$RES/generation-$model.json"; echo
    done
    PAIRS=${PAIRS:-32}
    ;&
  gate_cost)  # the gate alone toggled, in one process
    timeout "${BUDGET:-300}" python3 -m benchmarks.cuda_capture.run inprocess --toggle gate --pairs ${PAIRS:-16} \
      --tokens 256 --out "$RES/cost-gate-toggle.json"
    ;;
  batch_mode)  # issue 30: the batch mode's threads against one BatchGenerator (benchmarks/batch_mode.py)
    for model in ${MODELS:-wide-gpu tiny}; do
      timeout "${BUDGET:-240}" python3 -m benchmarks.measure batch_mode --model $model --device gpu --shim \
        --sides ${SIDES:-threads_batch_mode,threads_batch_mode_pooled,threads_batch_mode_never_alone,threads_batch_mode_new_threads_join,lone_caller} \
        > "$RES/batch_mode-gpu-$model.json"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: v for k, v in d.items() if 'over' in k})" \
        "$RES/batch_mode-gpu-$model.json"
    done
    ;;
esac
echo "finished at $(( $(date +%s) - START )) s"
