#!/usr/bin/env bash
# The CPU mini-study: 9 salience metrics x {static, reselect, regrow} x {global, local} selection on
# SST-2, MRPC and RTE with the packaged MiniLM at the LoRA-r8 budget (162 runs, one seed; about an
# hour on 2 CPU cores). Re-running finishes only the missing runs (skip_completed=true in the preset).
# Then the report, figures and metric overlap below rebuild everything committed in this folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/mini_study/runs}
# 26 training steps: the dynamic masks update three times. Reselect scores anew every 8 steps
# (8, 16, 24); regrow drops and regrows every 6 steps until 75 % of training (6, 12, 18).
# Two single-threaded jobs at a time (hydra/launcher=parallel).
RUN=(python run.py -m experiment=mini_study hydra/launcher=parallel)
"${RUN[@]}" mask=static hydra.sweep.dir=$OUT/static
"${RUN[@]}" mask=reselect mask.update_every_steps=8 hydra.sweep.dir=$OUT/reselect
"${RUN[@]}" mask=regrow mask.update_every_steps=6 hydra.sweep.dir=$OUT/regrow

# Tables: every metric x schedule x selection; the metric ablation (static, global); the schedules and
# scopes averaged over metrics. Figures: mask bars, per-module density, the metrics' overlap.
D=experiments/mini_study
python -m speft.report $OUT --rows metric.name,mask.name,mask.selection --out $D/results_all
python -m speft.report $OUT --filter mask.name=static --filter mask.selection=global --rows metric.name \
    --out $D/results_metrics
python -m speft.report $OUT --rows mask.name,mask.selection --out $D/results_masks
# The overlap of the selections on SST-2 at the run's budget, from the score files of the static global
# runs (random and magnitude keep no score file; the others are in the score cache).
python - "$OUT" > $D/overlap_inputs.txt <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1], "static").glob("*/results.json")):
    r = json.loads(p.read_text())
    c = r["config"]
    if (c["task"]["name"], c["mask"]["selection"]) == ("glue/sst2", "global") and r["scoring"].get("path"):
        print(p.parent)
PY
python -m speft.report.overlap --density lora:8 --json $D/overlap.json $(cat $D/overlap_inputs.txt)
rm $D/overlap_inputs.txt
python -m speft.report $OUT --figures $D/figures --overlap $D/overlap.json > /dev/null
