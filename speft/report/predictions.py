"""Do two runs predict the same examples? A paired, example-by-example comparison of their predictions.

    python -m speft.report.predictions [--split validation] RUN RUN [RUN ...]

Every classification or regression run writes ``predictions_<split>.jsonl`` beside its ``results.json``
(one row per example of the split, in file order: ``index``, ``label``, ``prediction``). Two runs that
evaluated the same split pair row by row; for every pair of RUNs the command prints, as a Markdown table:

* classification: how many examples each run gets right, on how many the two predict different classes,
  the discordant pairs (right in one run only, each way) and McNemar's exact test on them (a two-sided
  binomial test of the discordant counts, scipy): do the runs differ in accuracy beyond chance?
* regression (STS-B): the mean absolute difference of the two runs' scores and their Pearson correlation.

Equal accuracies with many discordant examples are two different models that happen to score alike;
equal accuracies with none are the same predictions.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from speft.report.tables import markdown_table


def read_predictions(run: Path, split: str) -> list[dict]:
    """The rows of ``RUN/predictions_<split>.jsonl`` (a run folder or the file itself), checked for the fields."""
    path = Path(run)
    if path.suffix != ".jsonl":  # a run folder
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder")
        path = path / f"predictions_{split}.jsonl"
    if not path.is_file():
        written = sorted(p.name for p in path.parent.glob("predictions_*.jsonl"))
        raise FileNotFoundError(f"{path}: no predictions file (the run folder has: {', '.join(written) or 'none'}; "
                                f"runs before predictions were written have none: re-run to get one)")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            missing = [k for k in ("index", "label", "prediction") if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: not a predictions row: it lacks {', '.join(missing)}")
            rows.append(row)
    return rows


def paired(a: list[dict], b: list[dict], name_a: str = "A", name_b: str = "B") -> dict:
    """The comparison of two runs' rows (:func:`read_predictions`) on the same examples."""
    if [r["index"] for r in a] != [r["index"] for r in b] or [r["label"] for r in a] != [r["label"] for r in b]:
        raise ValueError(f"{name_a} and {name_b} did not evaluate the same examples (indices or labels differ: "
                         "another split, task or max_eval_examples)")
    y = np.array([r["label"] for r in a])
    pa, pb = np.array([r["prediction"] for r in a]), np.array([r["prediction"] for r in b])
    out: dict = {"a": name_a, "b": name_b, "examples": len(y)}
    if np.issubdtype(y.dtype, np.floating) or np.issubdtype(pa.dtype, np.floating):  # regression scores
        from scipy.stats import pearsonr

        out.update(mean_abs_difference=float(np.abs(pa - pb).mean()),
                   pearson=float(pearsonr(pa, pb).statistic) if len(y) > 1 else float("nan"))
        return out
    from scipy.stats import binomtest

    ra, rb = pa == y, pb == y
    only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    out.update(correct_a=int(ra.sum()), correct_b=int(rb.sum()), differ=int((pa != pb).sum()),
               only_a=only_a, only_b=only_b,
               mcnemar_p=binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0)
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one line per pair of runs."""
    if all("mcnemar_p" in r for r in rows):
        header = ["A", "B", "examples", "right A", "right B", "predictions differ", "right in A only",
                  "right in B only", "McNemar p (exact)"]
        body = [[r["a"], r["b"], r["examples"], r["correct_a"], r["correct_b"], r["differ"], r["only_a"],
                 r["only_b"], f"{r['mcnemar_p']:.3g}"] for r in rows]
        numeric = [False, False] + [True] * 7
    else:
        header = ["A", "B", "examples", "mean |A - B|", "Pearson r"]
        body = [[r["a"], r["b"], r["examples"], f"{r['mean_abs_difference']:.4f}", f"{r['pearson']:.4f}"]
                for r in rows]
        numeric = [False, False, True, True, True]
    return markdown_table(header, body, numeric)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speft.report.predictions", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or their predictions_<split>.jsonl)")
    parser.add_argument("--split", default="validation", help="the evaluation split (default validation)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs")
    runs = {str(p): read_predictions(p, args.split) for p in args.runs}
    rows = [paired(runs[a], runs[b], a, b) for a, b in itertools.combinations(runs, 2)]
    print(table(rows))


if __name__ == "__main__":
    main()
