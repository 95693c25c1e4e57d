"""Wall-clock seconds of `python run.py debug=fast logger=none` for every packaged model x task whose data
is on this machine, as a whole process (imports, loading, scoring, training, evaluation).

    python experiments/debug_fast/measure.py [--out experiments/debug_fast/times.json]

Run it on an idle machine: the README's table is its output (`--markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Packaged models and the tasks each can run here (QNLI, CoLA, QQP and MNLI have no local training files;
# the encoder has no causal-LM head for GSM8K and MMLU)
COMBOS = [("minilm", t) for t in ("rotten_tomatoes", "glue/sst2", "glue/mrpc", "glue/rte", "glue/stsb")] + \
         [("smollm2_135m", t) for t in ("rotten_tomatoes", "glue/sst2", "glue/mrpc", "glue/rte", "glue/stsb", "gsm8k",
                                        "mmlu")]


def measure(model: str, task: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "run.py", "debug=fast", "logger=none", f"model={model}", f"task={task}",
               f"hydra.run.dir={tmp}/run"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        wall = time.perf_counter() - t0
        result = json.loads(Path(tmp, "run", "results.json").read_text()) if proc.returncode == 0 else {}
    return {"model": model, "task": task, "wall_s": round(wall, 1), "ok": proc.returncode == 0,
            "pipeline_s": result.get("timings", {}).get("total_s"), "metrics": result.get("metrics"),
            "error": proc.stderr[-500:] if proc.returncode else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "debug_fast" / "times.json")
    args = p.parse_args()
    rows = []
    for model, task in COMBOS:
        rows.append(measure(model, task))
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows},
                                   indent=1) + "\n")
    print("| model | task | wall (s) |\n|---|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['task']} | {r['wall_s']:.0f}{'' if r['ok'] else ' (failed)'} |")


if __name__ == "__main__":
    main()
