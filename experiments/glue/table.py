"""Collect GLUE results.json files into a mean ± std table (rows: method or metric, columns: tasks).

``python experiments/glue/table.py <sweep dir>... [--out experiments/glue/cpu_minilm]`` writes
``results.md`` and ``results.csv``. The cell is the task's main GLUE metric in percent (the final
evaluation; ``--best`` for the best epoch), over seeds; failed or missing runs are shown as such.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

MAIN = {"glue/sst2": "accuracy", "glue/mrpc": "f1", "glue/rte": "accuracy", "glue/qnli": "accuracy",
        "glue/cola": "matthews_correlation", "glue/stsb": "pearson", "glue/qqp": "f1", "glue/mnli": "accuracy"}


def label(config: dict) -> str:
    method = config["method"]["name"]
    return f"sparse/{config['metric']['name']}" if method == "sparse" else method


def collect(dirs: list[Path], best: bool) -> tuple[dict, list[str], list[str], list[str]]:
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: list[str] = []
    for d in dirs:
        for path in sorted(d.rglob("results.json")):
            data = json.loads(path.read_text())
            config = data["config"]
            task = config["task"]["name"]
            if data["status"] != "completed":
                failed.append(f"{label(config)} {task} seed {config['seed']}: {data['error']['message']}")
                cells.setdefault((label(config), task), [])
                continue
            split = "validation_matched" if task == "glue/mnli" else "validation"
            source = data["best_metrics"] if best else data["metrics"]
            cells[(label(config), task)].append(100 * source[f"{split}/{MAIN[task]}"])
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.startswith("sparse"), r))
    tasks = sorted({t for _, t in cells})
    return cells, rows, tasks, failed


def fmt(values: list[float]) -> str:
    if not values:
        return "failed"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} (n={len(values)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--best", action="store_true", help="best-epoch instead of final metrics")
    args = p.parse_args()
    cells, rows, tasks, failed = collect(args.dirs, args.best)
    header = ["method", *[f"{t.split('/')[1]} ({MAIN[t]})" for t in tasks], "average"]
    table = []
    for r in rows:
        means = [statistics.mean(cells[(r, t)]) for t in tasks if cells.get((r, t))]
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(tasks) else "incomplete"
        table.append([r, *[fmt(cells.get((r, t), [])) if (r, t) in cells else "missing" for t in tasks], avg])
    best_avg = max((float(row[-1]) for row in table if row[-1] != "incomplete"), default=None)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        mark = " **(best)**" if best_avg is not None and row[-1] == f"{best_avg:.2f}" else ""
        lines.append("| " + " | ".join(row[:-1] + [row[-1] + mark]) + " |")
    if failed:
        lines += ["", "Failed runs:", *[f"- {f}" for f in failed]]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "results_best" if args.best else "results"
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
