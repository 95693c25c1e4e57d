#!/usr/bin/env bash
# CPU measurements with the packaged SmolLM2-135M (2 cores): evaluation throughput and accuracy on
# subsets of GSM8K and MMLU, zero-shot (the model as loaded: trainer.max_steps=0).
# Full test sets are out of reach on CPU (1,319 GSM8K problems at ~0.05 problem/s; 14,042 MMLU
# questions at ~0.7 question/s), so the subsets are the first 10 GSM8K test problems and 2 questions
# from each of the 57 MMLU subjects. About 5 minutes on an idle 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMON=(model=smollm2_135m logger=none trainer.num_threads=2 method.save_adapter=false)
G=experiments/gsm8k/cpu_smollm2
M=experiments/mmlu/cpu_smollm2
python run.py "${COMMON[@]}" task=gsm8k task.max_eval_examples=10 method=full trainer.max_steps=0 \
    hydra.run.dir=$G/zero_shot
python run.py "${COMMON[@]}" task=mmlu task.max_eval_examples=114 method=full trainer.max_steps=0 \
    hydra.run.dir=$M/zero_shot
