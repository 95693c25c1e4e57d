"""How much do salience metrics agree? Pairwise overlap of their selected sets and rank correlation.

    python -m speft.report.overlap --density 0.01 [--selection global|local] [--json PATH] INPUT [INPUT ...]

Each INPUT is a run folder (its ``results.json`` names the score file in ``scoring.path``; runs with
``metric.cache=false`` have none) or a score file from the cache (``<cache_dir>/scores/*.safetensors``).
All inputs must score the same target modules. For every pair the command prints, as a Markdown table:

* IoU: |A ∩ B| / |A ∪ B| of the entries each metric selects at ``--density`` (same forms as the run's
  ``density``: a fraction, a count or ``lora:<r>``) with the given selection (global or per-module top-k,
  the same exact, deterministic selection as training);
* Spearman ρ: per target module, the Pearson correlation of the scores' ranks (ties get their
  average rank), then the mean and the minimum over modules.

``--json PATH`` also writes the pairs and the full label × label matrices (:func:`matrices`), a few
hundred bytes that rebuild the IoU figure (``speft.report.figures.overlap_heatmap``) without the scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from speft.config import Budget
from speft.masks.selection import SELECTIONS, select
from speft.report.tables import markdown_table
from speft.results import RESULTS_FILE
from speft.salience.cache import read
from speft.tasks.base import spearman  # the one Spearman (scipy; NaN for a constant input)

Scores = dict[str, torch.Tensor]


def load_input(path: Path) -> tuple[str, Scores]:
    """(label, scores) of a run folder or a score file; the label is the metric's name."""
    path = Path(path)
    if path.is_dir():
        results = path / RESULTS_FILE
        if not results.exists():
            raise SystemExit(f"{path}: no {RESULTS_FILE}")
        data = json.loads(results.read_text())
        score_file = (data.get("scoring") or {}).get("path")
        if not score_file:
            raise SystemExit(f"{path}: results.json records no score file (scoring.path); "
                             f"rerun with metric.cache=true to save the scores")
        _, scores = load_input(Path(score_file))
        return str(data.get("config", {}).get("metric", {}).get("name", path.name)), scores
    scores, metadata = read(path)
    try:
        label = json.loads(metadata["key"])["metric"]["name"]
    except (KeyError, ValueError, TypeError):
        label = path.stem.split("-")[0]
    return label, scores


def parse_density(raw: str):
    if raw.startswith("lora:"):
        return raw
    return float(raw) if any(c in raw for c in ".eE") else int(raw)


def selection_masks(scores: Scores, k: int, selection: str, budget: Budget | None = None) -> dict[str, torch.Tensor]:
    """Boolean mask (flat) of the selected entries, per module (local counts by the budget's form, as training)."""
    indices = select(selection, scores, k, budget)
    masks = {}
    for name, s in scores.items():
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[indices[name]] = True
        masks[name] = m
    return masks


def iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def compare(inputs: list[tuple[str, Scores]], density, selection: str = "global") -> tuple[int, list[dict]]:
    """Budget k and one row per pair: ``a``, ``b``, ``iou``, ``spearman_mean``, ``spearman_min``."""
    shapes = {n: tuple(s.shape) for n, s in inputs[0][1].items()}
    for label, scores in inputs[1:]:
        if {n: tuple(s.shape) for n, s in scores.items()} != shapes:
            raise SystemExit(f"'{label}' scores other target modules than '{inputs[0][0]}'")
    budget = Budget.parse(density)
    k = budget.resolve({n: (s[0], s[1] if len(s) > 1 else 1) for n, s in shapes.items()})
    masks = [selection_masks(scores, k, selection, budget) for _, scores in inputs]
    rows = []
    for (i, (la, sa)), (j, (lb, sb)) in itertools.combinations(enumerate(inputs), 2):
        rhos = [spearman(sa[n], sb[n]) for n in shapes]
        rows.append({"a": la, "b": lb, "iou": iou(masks[i], masks[j]),
                     "spearman_mean": sum(rhos) / len(rhos), "spearman_min": min(rhos)})
    return k, rows


def table(rows: list[dict]) -> str:

    header = ["metric A", "metric B", "IoU of selected sets", "Spearman ρ (mean over modules)", "Spearman ρ (min)"]
    body = [[r["a"], r["b"], *(f"{r[k]:.4f}" for k in ("iou", "spearman_mean", "spearman_min"))] for r in rows]
    return markdown_table(header, body, [False, False, True, True, True]).rstrip("\n")


def unique_labels(inputs: list[tuple[str, Scores]]) -> list[tuple[str, Scores]]:
    seen: dict[str, int] = {}
    out = []
    for label, scores in inputs:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", scores))
    return out


def matrices(labels: list[str], rows: list[dict]) -> dict[str, list[list[float]]]:
    """Symmetric label × label matrices of ``compare``'s rows: ``iou``, ``spearman_mean``, ``spearman_min``
    (1 on the diagonal: a metric against itself)."""
    n = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    out = {key: [[1.0 if i == j else float("nan") for j in range(n)] for i in range(n)]
           for key in ("iou", "spearman_mean", "spearman_min")}
    for r in rows:
        i, j = index[r["a"]], index[r["b"]]
        for key, m in out.items():
            m[i][j] = m[j][i] = r[key]
    return out


def overlap_record(inputs: list[tuple[str, Scores]], density, selection: str = "global",
                   sources: list[str] | None = None) -> dict:
    """Everything the ``--json`` file holds: the settings, the budget ``k``, the labels, the pairs and the
    matrices. ``sources`` names where each input came from (run folders or score files)."""
    k, rows = compare(inputs, density, selection)
    labels = [label for label, _ in inputs]
    record = {"density": str(density), "selection": selection, "k": k, "labels": labels,
              **matrices(labels, rows), "pairs": rows}
    if sources is not None:
        record["sources"] = [str(s) for s in sources]
    return record


def _json_safe(x):
    """NaN (a constant score tensor's ρ) as null: strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


def write_json(path: Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(record), indent=1) + "\n")


def read_json(path: Path) -> dict:
    """A file written by ``--json``; null entries come back as NaN."""
    record = json.loads(Path(path).read_text())
    missing = [k for k in ("labels", "iou") if k not in record]
    if missing:
        raise ValueError(f"{path}: not an overlap JSON (python -m speft.report.overlap --json); "
                         f"it lacks {', '.join(missing)}")
    for key in ("iou", "spearman_mean", "spearman_min"):
        if key in record:
            record[key] = [[float("nan") if v is None else v for v in row] for row in record[key]]
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speft.report.overlap", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="run folders or score files (.safetensors)")
    parser.add_argument("--density", default="0.01", help="fraction, count or lora:<r> (default 0.01)")
    parser.add_argument("--selection", default="global", choices=sorted(SELECTIONS))
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the pairs and the label x label IoU and Spearman matrices as JSON")
    args = parser.parse_args(argv)
    if len(args.inputs) < 2:
        parser.error("give at least two inputs")
    inputs = unique_labels([load_input(p) for p in args.inputs])
    record = overlap_record(inputs, parse_density(args.density), args.selection, sources=args.inputs)
    k, rows = record["k"], record["pairs"]
    print(f"density {args.density} ({k:,} entries), {args.selection} selection, {len(inputs)} inputs\n")
    print(table(rows))
    if args.json:
        write_json(args.json, record)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
