"""Measured peak memory of short runs against the pre-flight estimate (``speft.memory``).

    python experiments/memory/measure.py [--out experiments/memory/measured.json]

Each case is ``python run.py ... trainer.max_steps=3 logger=none`` in a fresh process (its own peak RSS,
``results.json``'s ``peak_memory_mb.rss``), whose ``memory_estimate_mb`` pre-flight recorded. The lengths are
chosen so that batches are full (every example reaches ``task.max_length``): the estimate is for full
batches, the worst case a run meets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["logger=none", "trainer.max_steps=3", "trainer.num_threads=1", "method.save_adapter=false",
          "trainer.eval_every_steps=100000", "task.max_eval_examples=8", "metric.num_score_examples=64",
          "task.max_train_examples=256"]
CASES = {
    "minilm/mrpc/sparse": ["task=glue/mrpc", "task.max_length=48"],
    "minilm/mrpc/sparse/batch64": ["task=glue/mrpc", "task.max_length=48", "trainer.batch_size=64"],
    "minilm/mrpc/lora": ["task=glue/mrpc", "task.max_length=48", "method=lora"],
    "minilm/mrpc/full": ["task=glue/mrpc", "task.max_length=48", "method=full"],
    "smollm2/gsm8k/sparse": ["model=smollm2_135m", "task=gsm8k", "task.max_length=128", "trainer.batch_size=4",
                             "trainer.grad_accum_steps=1", "task.max_eval_examples=1", "task.evaluation=nll",
                             "task.generate_examples=0", "metric.num_score_examples=8"],
    "smollm2/gsm8k/sparse/checkpointing": ["model=smollm2_135m", "task=gsm8k", "task.max_length=128",
                                           "trainer.batch_size=4", "trainer.grad_accum_steps=1",
                                           "trainer.gradient_checkpointing=true", "task.max_eval_examples=1",
                                           "task.evaluation=nll", "task.generate_examples=0",
                                           "metric.num_score_examples=8"],
    "smollm2/gsm8k/lora": ["model=smollm2_135m", "task=gsm8k", "task.max_length=128", "trainer.batch_size=4",
                           "trainer.grad_accum_steps=1", "method=lora", "task.max_eval_examples=1",
                           "task.evaluation=nll", "task.generate_examples=0"],
}
# The same on an NF4 base (model.quantization=nf4): sparse and QLoRA
CASES.update({f"{name}/nf4": [*CASES[name], "model.quantization=nf4"]
              for name in ("minilm/mrpc/sparse", "minilm/mrpc/lora", "smollm2/gsm8k/sparse", "smollm2/gsm8k/lora")})


def measure(name: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "run.py", *COMMON, *overrides, f"hydra.run.dir={tmp}",
                               f"paths.cache_dir={tmp}/cache"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(Path(tmp, "results.json").read_text())
    est, rss = r["memory_estimate_mb"], r["peak_memory_mb"]["rss"]
    return {"case": name, "overrides": overrides, "estimate_mb": est["peak"], "measured_rss_mb": rss,
            "ratio": round(rss / est["peak"], 3), "estimate": est, "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "memory" / "measured.json")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                   help="cases to measure; the other rows of --out are kept")
    args = p.parse_args()
    rows = {r["case"]: r for r in json.loads(args.out.read_text())} if args.out.is_file() else {}
    for name in args.cases:
        rows[name] = measure(name, CASES[name])
        print(json.dumps({k: rows[name][k] for k in ("case", "estimate_mb", "measured_rss_mb", "ratio")}), flush=True)
    ordered = [rows[name] for name in CASES if name in rows]
    args.out.write_text(json.dumps(ordered, indent=1) + "\n")


if __name__ == "__main__":
    main()
