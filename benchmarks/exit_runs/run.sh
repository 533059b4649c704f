#!/bin/bash
# The exit-abort count (issue: aborts at interpreter exit): N runs of the exit script of
# tests/test_thread_end.py without and with the shim, P at a time; prints the counts.
N=${1:-200}; P=${2:-16}; PY=${PYTHON:-python3}
"$PY" -c "from mlx_threadsafe.testing import build_lm; build_lm('llama')"
SCRIPT=$(cat tests/exit_script.py)
for side in plain shim; do
  seq "$N" | xargs -P "$P" -I{} sh -c '"$1" -c "$0" '"$side"' >/dev/null 2>/tmp/exit-'"$side"'-{}.err; echo $?' "$SCRIPT" "$PY" > /tmp/exit-$side.codes
  aborts=$(grep -vc '^0$' /tmp/exit-$side.codes)
  terminated=$(grep -l "terminate called" /tmp/exit-$side-*.err 2>/dev/null | wc -l)
  echo "$side: $aborts of $N runs exited non-zero; $terminated printed 'terminate called'"
done
