#!/bin/bash
# Replaced by the rate harness (issue 29 part 2); kept as a shortcut for the old count:
# N runs of tests/exit_script.py per side in fresh interpreters, P at a time, added to
# benchmarks/results/abort-rates.json (record thread_end_exec/plain and thread_end_exec/shim).
# The cheaper count of the same script (forked children): --scenario thread_end.
N=${1:-200}; P=${2:-2}; PY=${PYTHON:-python3}
exec "$PY" -m benchmarks.abort_rates run --scenario thread_end_exec --runs "$N" --parallel "$P"
