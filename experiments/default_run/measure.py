"""Time the default run: ``python experiments/default_run/measure.py [--runs 3]``.

Runs ``python run.py`` (no overrides: W&B in auto mode, offline without credentials) the given number
of times, one after another, measuring wall-clock time from process start to exit (model load
included), and writes ``summary.json`` beside this file: per run the wall time, the test and
validation accuracy and the run's own timings, plus medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out}"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            res = json.loads((out / "results.json").read_text())
            runs.append({"wall_s": round(wall, 1), **res["metrics"], "timings": res["timings"],
                         "peak_memory_mb": res["peak_memory_mb"], "git_sha": res["git_sha"]})
            print(json.dumps(runs[-1]), flush=True)
    summary = {
        "command": "python run.py",
        "machine": f"{__import__('os').cpu_count()} CPU cores",
        "versions": res["versions"],
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_test_accuracy": statistics.median(r["test/accuracy"] for r in runs),
        "runs": runs,
    }
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
