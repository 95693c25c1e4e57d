#!/usr/bin/env bash
# One-command GPU check (experiments/gpu/check.py): one JSON line per check in experiments/gpu/check-<device>.jsonl.
#   experiments/gpu/check.sh                       # on a GPU machine (about 10 minutes on one H100)
#   QUICK=1 DEVICE=cpu experiments/gpu/check.sh    # the CPU-possible parts, small (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" experiments/gpu/check.py "$@"
