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
