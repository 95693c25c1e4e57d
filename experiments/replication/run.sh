#!/usr/bin/env bash
# The laptop-scale replication (README.md beside this file): every stage of grid.py, then the tables,
# paired tests and figures. Re-running completes only what is missing (finished runs are skipped).
#   TASKS=glue/sst2,glue/mrpc SEEDS=1,2,3 OUT=/tmp/rep DATA=/data bash experiments/replication/run.sh
# STAGES picks grid stages (default all: tune,a,warmup,b,density,lm); JOBS runs side by side (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
D=experiments/replication
OUT=${OUT:-$D/runs}
export OUT
python $D/grid.py --stages "${STAGES:-tune,a,warmup,b,density,lm}" --jobs "${JOBS:-2}"
python $D/tables.py "$OUT" "$D"
