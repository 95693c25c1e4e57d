"""The replication's tables from its runs (whatever stages are complete; a missing stage is skipped).

    python experiments/replication/tables.py [RUNS] [OUT_DIR]     # defaults: runs/ and this folder

Writes into OUT_DIR (Markdown, LaTeX and CSV each, through ``speft.report``):

* ``separation.md``: per task, the majority-class score of its reported split and the best Table A
  mean; a task whose best method is not 5 points above it (a correlation: not clearly above zero)
  "does not separate" and is left out of the averages and paired tests below;
* ``tuning.*``: the held-out score of every method at every learning rate, and ``lr.json``'s choices;
* ``table_a.*``: every metric (static, global) and the baselines, mean ± 95 % t interval over seeds,
  with each row's paired difference from ``sparse/grad`` (``table_a_paired.csv``);
* ``table_b.*``: ``grad`` and ``fisher`` × mask schedule × selection (Table A's static global cells
  included), paired against ``grad/static/global``;
* ``warmup.*``: scoring through the fresh head (Table A) vs after 20 head warm-up steps, paired against
  ``sparse/grad/20`` (``warmup_paired.csv``: the claims' comparisons with a warmed-up head);
* ``density.*``: ``grad``, ``random`` and LoRA at lora:1 to lora:32 on the density task;
* ``lm.*``: the causal-LM panel, the reference solutions' token NLL (lower is better) and exact match;
* ``verdicts.md``/``.json``: the study's four claims decided by the rules of ``verdicts.py``;
* ``figures/``: PNG and PDF, as the notebook draws them: ``tuning`` (held-out score against the learning
  rate), ``table_b`` (schedule × selection), ``density`` (score against the trainable fraction) and
  ``overlap_sst2`` (the metrics' mask IoU, from ``overlap_sst2.json``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from speft.report import load_records, pivot
from speft.report.collect import ReportError
from speft.report.tables import paired_csv, paired_latex, paired_markdown, to_csv, to_latex, to_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import verdicts  # noqa: E402

SEEDS = len(grid.SEEDS.split(","))  # seeds per cell: the grid's default


def missing_seeds(a: pd.DataFrame, tasks: list[str]) -> str | None:
    """Why Table A's verdicts are provisional: rows of the kept tasks with fewer than SEEDS seeds (None: none)."""
    kept = a[a["task.name"].isin(tasks)]
    rows = kept[["method.name", "metric.name"]].drop_duplicates().shape[0] * len(tasks)
    return incomplete("Table A", kept, ["task.name", "method.name", "metric.name"], rows)


def missing_b(b: pd.DataFrame, tasks: list[str]) -> str | None:
    """Why claims 2 and 3 are provisional: Table B's cells on the kept tasks (the grid's default Table B tasks,
    metrics, schedules and selections, less Table A's static global cell) with fewer than SEEDS seeds."""
    tasks_b = [t for t in grid.TASKS_B.split(",") if t in tasks]
    cells = len(tasks_b) * len(grid.B_METRICS) * (len(grid.SCHEDULES) * len(grid.SELECTIONS) - 1)
    kept = b[b["task.name"].isin(tasks_b)] if len(b) else b
    return incomplete("Table B", kept, ["task.name", "metric.name", "mask.name", "mask.selection"], cells,
                      "; claims 2 and 3 rest on it")


def incomplete(table: str, runs: pd.DataFrame, keys: list[str], cells: int, note: str = "") -> str | None:
    """What ``runs`` (one table's runs of the kept tasks, cells told apart by ``keys``) lack of ``cells`` cells
    with SEEDS seeds each; None when nothing."""
    done = int((runs.groupby(keys, dropna=False)["seed"].nunique() >= SEEDS).sum()) if len(runs) else 0
    if done >= cells:
        return None
    return (f"{table} holds {len(runs)} of {cells * SEEDS} runs of the kept tasks ({done} of {cells} cells have all "
            f"{SEEDS} seeds{note})")


HERE = Path(__file__).resolve().parent
MARGIN = 5.0  # points above the majority class that make a task "separate" (the rule)
CORRELATION_FLOOR = 10.0  # a correlation (×100) clearly above zero


def write(out: Path, name: str, table, reference: str | None = None) -> str:
    md, tex = to_markdown(table), to_latex(table)
    if reference and reference in table.rows:
        md += "\n" + paired_markdown(table, reference)
        tex += "\n" + paired_latex(table, reference)
        (out / f"{name}_paired.csv").write_text(paired_csv(table, reference))
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.tex").write_text(tex)
    (out / f"{name}.csv").write_text(to_csv(table))
    print(f"wrote {out / name}.{{md,tex,csv}}", file=sys.stderr)
    return md


def stage(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs of one stage (the first folder under RUNS)."""
    return df[df["run"].map(lambda r: Path(r).parts[-4] == name if len(Path(r).parts) >= 4 else False)]


def majority_scores(tasks: list[str], data_dir: str | None, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Each task's main metric (×100) on its reported split (with ``extra`` overrides, e.g. the tuning's
    held-out split) when every prediction is the training set's most frequent label; NaN for regression (a
    constant has no correlation)."""
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    import speft.components  # noqa: F401  registers the tasks
    from speft import registry
    from speft.config import PROJECT_ROOT, validate

    if str(PROJECT_ROOT) not in sys.path:  # hydra_plugins/ (the config's sweeper) lives at the project root
        sys.path.insert(0, str(PROJECT_ROOT))
    out = {}
    for task in tasks:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["experiment=replication", f"task={task}", *extra,
                                                           *([f"paths.data_dir={data_dir}"] if data_dir else [])])
        spec = validate(cfg)
        t = registry.get("task", task).obj(spec.task, spec.paths.resolve("data_dir"))
        splits = t.splits()
        labels = [r["label"] for r in splits["train"]]
        if isinstance(labels[0], float):
            out[task] = math.nan
            continue
        common = Counter(labels).most_common(1)[0][0]
        gold = [r["label"] for r in splits[t.validation_split]]
        logits = np.zeros((len(gold), max(2, t.num_labels)))
        logits[:, common] = 1.0
        metrics = t.compute_metrics(torch.tensor(logits), torch.tensor(gold))
        out[task] = 100 * metrics[t.main_metric]
    return out


def separates(best: float, majority: float) -> bool:
    """The issue's rule: the best method at least MARGIN points above the majority class (×100); a correlation
    (no majority class) at least CORRELATION_FLOOR."""
    return best >= CORRELATION_FLOOR if math.isnan(majority) else best >= majority + MARGIN


def separation(table_a, majority: dict[str, float], screened: dict | None = None) -> tuple[list[str], str]:
    """The tasks that separate in Table A (``table_a`` None: none run yet), and the Markdown table saying why,
    with the tasks the tuning-stage screen (``screened``: ``runs/screen.json``) already left out."""
    lines = ["| task | majority class | best method (mean) | margin | separates |", "|---|---:|---:|---:|---|"]
    keep = []
    for col in table_a.cols if table_a is not None else []:
        means = {r: table_a.cell(r, col).mean for r in table_a.rows}
        means = {r: m for r, m in means.items() if not math.isnan(m)}
        if not means:
            continue
        best = max(means, key=means.get)
        base = majority.get(col, math.nan)
        ok = separates(means[best], base)
        keep += [col] if ok else []
        margin = "—" if math.isnan(base) else f"{means[best] - base:+.2f}"
        lines.append(f"| {col} | {'— (regression)' if math.isnan(base) else f'{base:.2f}'} | {best}: "
                     f"{means[best]:.2f} | {margin} | {'yes' if ok else 'does not separate'} |")
    for task, s in sorted((screened or {}).items()):
        if not s["separates"]:
            base = "— (regression)" if s["majority"] is None else f"{s['majority']:.2f} (held-out)"
            margin = "—" if s["majority"] is None else f"{s['best'] - s['majority']:+.2f}"
            lines.append(f"| {task} | {base} | {s['best_key']}: {s['best']:.2f} (tuning, held-out) | {margin} | "
                         f"does not separate (tuning stage) |")
    rule = (f"\nA task separates when its best Table A mean is at least {MARGIN:g} points above the majority class "
            f"of its reported split (a correlation: at least {CORRELATION_FLOOR:g}); only those enter averages and "
            f"paired tests. The same rule screens every task after the tuning stage, on the held-out split with each "
            f"method at its chosen learning rate (`runs/screen.json`): a task that fails it there runs no later stage."
            f"\n")
    return keep, "\n".join(lines) + "\n" + rule


def table_a_cells(a: pd.DataFrame, metrics: list[str], tasks) -> pd.DataFrame:
    """Table A's runs of LoRA and of sparse ``metrics`` on ``tasks``: a panel's cells at its own setting."""
    sparse = (a["method.name"] == "sparse") & a["metric.name"].isin(metrics)
    return a[a["task.name"].isin(tasks) & ((a["method.name"] == "lora") | sparse)]


def panels(df: pd.DataFrame, a: pd.DataFrame, parts: dict, frames: dict) -> None:
    """The warm-up, density and causal-LM tables into ``parts`` (name -> table or (table, paired reference));
    the density runs, with Table A's cells of the same methods, into ``frames`` (its figure)."""
    w = stage(df, "warmup")
    if len(w):
        same = table_a_cells(a, ["grad", "magnitude", "random"], w["task.name"].unique())
        # paired against grad under the switch: claims 1 (random, magnitude) and 4 (LoRA) with a warmed-up head
        parts["warmup"] = (pivot(pd.concat([w, same]),
                                 rows=["method.name", "metric.name", "trainer.head_warmup_steps"], interval="ci95"),
                           "sparse/grad/20")
    d = stage(df, "density")
    if len(d):
        frames["density"] = pd.concat([d, table_a_cells(a, ["grad", "random"], [d["task.name"].iloc[0]])])
        parts["density"] = pivot(frames["density"], rows=["method.name", "metric.name"], cols=["budget"],
                                 interval="ci95", average=False)
    lm = stage(df, "lm")
    if len(lm):
        parts["lm"] = (pivot(lm, interval="ci95", scale=1, digits=4, average=False), "sparse/grad")
        parts["lm_exact_match"] = pivot(lm, interval="ci95", metric="test/flexible_extract", average=False)


def draw(out: Path, frames: dict[str, pd.DataFrame]) -> None:
    """``out/figures/<name>.png`` and ``.pdf`` through speft.report.figures, as the notebook draws them: the
    tuning curves, Table B's schedule × selection bars, the density curve and the metrics' mask overlap."""
    import matplotlib.pyplot as plt

    from speft.report import figures

    draws = {"tuning": figures.lr_sweep, "table_b": functools.partial(figures.mask_bars, average_metrics=False),
             "density": figures.density_sweep}
    made = [(name, draws[name](frame)) for name, frame in frames.items()]
    if (out / "overlap_sst2.json").exists():
        made.append(("overlap_sst2", figures.overlap_heatmap(out / "overlap_sst2.json", key="iou")))
    for name, fig in made:
        figures.save(fig, out / "figures" / name)
        plt.close(fig)
    print(f"wrote {out / 'figures'}/{{{','.join(n for n, _ in made)}}}.{{png,pdf}}", file=sys.stderr)


def main(argv: list[str]) -> None:
    runs = Path(argv[0]) if argv else HERE / "runs"
    out = Path(argv[1]) if len(argv) > 1 else HERE
    out.mkdir(parents=True, exist_ok=True)
    df = load_records([runs])
    if (runs / "lr.json").exists():
        (out / "lr.md").write_text("Chosen learning rates (held-out main metric, `tune` stage):\n\n```json\n"
                                   + (runs / "lr.json").read_text() + "```\n")
    parts, frames = {}, {}  # tables; the frames their figures draw
    tune = stage(df, "tune")
    if len(tune):
        frames["tuning"] = tune
        parts["tuning"] = pivot(tune, rows=["method.name", "metric.name", "trainer.lr"], interval="ci95")
    a = stage(df, "a")
    keep: list[str] = []
    screened = json.loads((runs / "screen.json").read_text()) if (runs / "screen.json").exists() else {}
    if len(a):
        full = pivot(a, interval="ci95")
        tasks = sorted(a["task.name"].dropna().unique())
        keep, text = separation(full, majority_scores(tasks, a["paths.data_dir"].dropna().iloc[0]
                                                      if "paths.data_dir" in a else None), screened)
        (out / "separation.md").write_text(text)
        write(out, "table_a_all_tasks", full)
        if keep:
            parts["table_a"] = (pivot(a, interval="ci95", filters=[f"task.name={','.join(keep)}"]), "sparse/grad")
    elif screened:  # no Table A yet: what the tuning-stage screen decided
        (out / "separation.md").write_text(separation(None, {}, screened)[1])
    b = stage(df, "b")
    if len(a):  # the four claims, by the rules fixed in verdicts.py
        why = [w for w in (missing_seeds(a, keep), missing_b(b, keep)) if w]
        verdicts.write(out, a, b if len(b) else None, keep, provisional="; ".join(why) or None)
    if len(b):
        grad_fisher = a[(a["method.name"] == "sparse") & a["metric.name"].isin(grid.B_METRICS)]
        both = pd.concat([b, grad_fisher[grad_fisher["task.name"].isin(b["task.name"].unique())]])
        frames["table_b"] = both
        parts["table_b"] = (pivot(both, rows=["metric.name", "mask.name", "mask.selection"], interval="ci95"),
                            "grad/static/global")
    panels(df, a, parts, frames)
    for name, part in parts.items():
        table, reference = part if isinstance(part, tuple) else (part, None)
        write(out, name, table, reference)
    draw(out, frames)
    summary = {"runs": int(len(df)), "completed": int((df["status"] == "completed").sum()),
               "by_stage": {s: int(len(stage(df, s))) for s in ("tune", "a", "warmup", "b", "density", "lm")},
               "separating_tasks": keep,
               "screened_out": sorted(t for t, s in screened.items() if not s["separates"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ReportError as e:
        raise SystemExit(f"tables.py: {e}") from None
