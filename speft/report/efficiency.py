"""Cost tables: the efficiency benchmark's JSONL (``python -m speft.tools.bench``) and the timings and peak
memory that every run records in its results.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from speft.report.collect import ReportError, apply_filters, natural_key
from speft.report.tables import default_rows, markdown_table, row_label

BENCH_COLUMNS = ("method", "step_s", "step_vs_lora", "peak_memory_mb", "memory_vs_lora", "trainable")
RUN_COSTS = {  # output column -> record column
    "total_s": "timings.total_s",
    "training_s": "timings.training_s",
    "scoring_s": "timings.scoring_s",
    "evaluation_s": "timings.evaluation_s",
    "peak_rss_mb": "peak_memory_mb.rss",
    "peak_cuda_mb": "peak_memory_mb.cuda_allocated",
    "trainable_params": "trainable_params",
}


def load_bench(path: str | Path) -> pd.DataFrame:
    """One row per JSON line of a benchmark file (``experiments/efficiency/bench_*.jsonl``)."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such benchmark file "
                          f"(python -m speft.tools.bench writes one JSON line per method)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ReportError(f"{path}: empty benchmark file")
    try:
        return pd.DataFrame.from_records([json.loads(line) for line in lines])
    except ValueError as e:
        raise ReportError(f"{path}: not JSON lines ({e})") from None


def bench_table(bench: pd.DataFrame) -> pd.DataFrame:
    """method, step_s, step_vs_lora, peak_memory_mb, memory_vs_lora, trainable. The ratios are recomputed
    from the LoRA line when there is one (and kept as recorded otherwise)."""
    missing = [c for c in ("method", "step_s", "peak_memory_mb") if c not in bench]
    if missing:
        raise ReportError(f"benchmark lines lack {', '.join(missing)}")
    table = bench.copy()
    lora = table[table["method"] == "lora"]
    if len(lora):
        table["step_vs_lora"] = table["step_s"] / float(lora["step_s"].iloc[0])
        table["memory_vs_lora"] = table["peak_memory_mb"] / float(lora["peak_memory_mb"].iloc[0])
    return table[[c for c in BENCH_COLUMNS if c in table]].reset_index(drop=True)


def run_costs(df: pd.DataFrame, rows: list[str] | None = None, filters: Iterable[str] = (),
              by_task: bool = True, reference: str | None = None) -> pd.DataFrame:
    """Mean recorded cost per row label (and task) over completed runs: seconds (total, training,
    scoring, evaluation), peak RSS (and CUDA) MB, trainable parameters, and the number of runs; with
    ``total_vs_lora`` and ``rss_vs_lora``, the ratios to the ``reference`` row (default: the LoRA row,
    when exactly one row is LoRA's)."""
    df = apply_filters(df, filters)
    df = df[df["status"] == "completed"]
    if df.empty:
        raise ReportError("no completed run to tabulate costs")
    rows = rows or default_rows(df)
    records = []
    for _, rec in df.iterrows():
        out = {"row": row_label(rec, rows)[0], "task": rec.get("task.name"), "method": rec.get("method.name")}
        for name, col in RUN_COSTS.items():
            v = rec.get(col)
            out[name] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
        records.append(out)
    long = pd.DataFrame.from_records(records)
    if reference is None:
        lora_rows = sorted(set(long.loc[long["method"] == "lora", "row"]))
        reference = lora_rows[0] if len(lora_rows) == 1 else None
    keys = ["task", "row"] if by_task else ["row"]
    table = long.groupby(keys).agg(runs=("total_s", "size"), **{k: (k, "mean") for k in RUN_COSTS}).reset_index()
    table = table.dropna(axis=1, how="all")
    if reference is not None:
        if reference not in set(table["row"]):
            known = ", ".join(sorted(set(table["row"])))
            raise ReportError(f"reference row {reference!r} is not among the rows: {known}")
        ref = table[table["row"] == reference].set_index("task" if by_task else "row")
        for col, name in (("total_s", "total_vs_lora"), ("peak_rss_mb", "rss_vs_lora")):
            if col not in table:
                continue
            base = table["task"].map(ref[col]) if by_task else float(ref[col].iloc[0])
            table[name] = table[col] / base
    order = sorted(range(len(table)), key=lambda i: tuple(natural_key(table.iloc[i][k]) for k in keys))
    return table.iloc[order].reset_index(drop=True)


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table (floats with ``digits`` significant places, large ones as whole
    numbers; thousands separators), without the optional ``tabulate`` dependency."""
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    body = [[cell(v, digits) for v in row] for row in frame.itertuples(index=False)]
    return markdown_table([str(c) for c in frame.columns], body, numeric)


def cell(v, digits: int) -> str:
    """One table cell: floats with ``digits`` significant places (large ones whole), ints with separators."""
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)
