#!/usr/bin/env bash
# The CPU-scale GLUE comparison (issue: "a real small-scale result"): the packaged MiniLM on SST-2,
# MRPC and RTE from ../shared/data/glue, a fixed 1,000-example training subset of each (subset_seed 0),
# the full dev sets, 2 epochs, 3 seeds; sparse with grad, snip, magnitude and random at the LoRA-r8
# budget against LoRA r8, full fine-tuning and the head alone. About 50 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/glue/cpu_minilm/runs
COMMON=(task=glue/sst2,glue/mrpc,glue/rte seed=1,2,3 task.max_train_examples=1000 task.subset_seed=0
        trainer.epochs=2 metric.num_score_examples=256 method.save_adapter=false logger=none)
# Parameter-efficient methods share the sparse default lr (2e-3); full fine-tuning takes the usual 5e-5.
python run.py -m "${COMMON[@]}" method=sparse metric=grad,snip,magnitude,random hydra.sweep.dir=$OUT/sparse
python run.py -m "${COMMON[@]}" method=lora,head_only hydra.sweep.dir=$OUT/baselines
python run.py -m "${COMMON[@]}" method=full trainer.lr=5e-5 trainer.head_lr=2e-3 hydra.sweep.dir=$OUT/full
python -m speft.report $OUT --out experiments/glue/cpu_minilm/results
python -m speft.report $OUT --value best --out experiments/glue/cpu_minilm/results_best
