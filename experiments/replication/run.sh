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
# How much the metrics' selections agree on SST-2 at the run's budget (seed 1's score files, from the score
# cache: random and magnitude keep none). Table A's runs once they exist, else the tuning runs (same scores).
STAGE=$([ -d "$OUT/a/glue-sst2" ] && echo "a/glue-sst2/*/seed1" || echo "tune/glue-sst2/*/lr0.001")
python -m speft.report.overlap --density lora:8 --json $D/overlap_sst2.json \
    $(ls -d $OUT/$STAGE | grep -v -e sparse-random -e sparse-magnitude -e /lora -e /pissa -e /dora -e /full -e /head_only) > /dev/null
