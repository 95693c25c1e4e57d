"""The study's four claims decided from the committed runs, by rules fixed before Table A was run (2026-12-06).

``tables.py`` calls :func:`write` once Table A exists; it writes ``verdicts.md`` and ``verdicts.json``.

Every comparison pools matched pairs over the tasks that separate (``separation.md``): (task, seed) pairs for
Table A's claims, (metric, task, seed) pairs over ``grad`` and ``fisher`` for Table B's. A difference is row minus
reference in points of the task's main metric (×100); each comparison gives the mean difference, its 95 %
percentile bootstrap interval and the two-sided sign-flip p-value (:func:`speft.report.stats.paired`). With a
margin of :data:`MARGIN` points:

* "at least as good as" (claim 1's "on par with the best metric", claims 2, 3 and 4): **reproduced** when the
  interval's lower end is above −MARGIN (non-inferior); **not reproduced** when its upper end is below −MARGIN
  (clearly worse); otherwise **inconclusive at this scale**;
* "clearly worse" (claim 1's magnitude and random masks): **reproduced** when ``grad`` minus the mask has its
  whole interval above 0 and a sign-flip p below :data:`ALPHA` (so a handful of pairs cannot decide it);
  **not reproduced** when the interval's upper end is below +MARGIN (no advantage of a
  margin's size); otherwise inconclusive;
* a claim of several parts is reproduced when every part is, not reproduced when any part is not, else
  inconclusive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from speft.report import pivot
from speft.report.stats import Paired, paired
from speft.report.tables import Table, matched_differences

ALPHA = 0.05  # a "clearly worse" difference: its sign-flip p-value below this too
MARGIN = 1.0  # points: the difference the comparisons must exclude (the study's tables differ by 0.5-11 points)
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this scale"
METRICS = ("random", "magnitude", "grad", "snip", "force", "taylor_fo", "synflow", "grasp", "fisher")
SCHEDULE_METRICS = ("grad", "fisher")  # Table B's metrics


def at_least_as_good(p: Paired) -> str:
    if not p.n:
        return INCONCLUSIVE
    if p.lo > -MARGIN:
        return REPRODUCED
    return NOT_REPRODUCED if p.hi < -MARGIN else INCONCLUSIVE


def clearly_better(p: Paired) -> str:
    if not p.n:
        return INCONCLUSIVE
    if p.lo > 0 and p.p < ALPHA:
        return REPRODUCED
    return NOT_REPRODUCED if p.hi < MARGIN else INCONCLUSIVE


def combine(parts: list[str]) -> str:
    if any(v == NOT_REPRODUCED for v in parts):
        return NOT_REPRODUCED
    return REPRODUCED if parts and all(v == REPRODUCED for v in parts) else INCONCLUSIVE


def compare(table: Table, pairs: list[tuple[str, str]]) -> Paired:
    """Pooled row-minus-reference differences of every (row, reference) in ``pairs`` over the table's columns."""
    diffs = [d for row, ref in pairs if row in table.rows and ref in table.rows
             for col in table.cols for d in matched_differences(table, row, ref, col)]
    return paired(diffs)


def claims(a: pd.DataFrame, b: pd.DataFrame | None, tasks: list[str]) -> list[dict]:
    """The four claims' parts, each a comparison with its numbers and verdict, and the claim's verdict."""
    only = [f"task.name={','.join(tasks)}"]
    ta = pivot(a, interval="ci95", filters=only)
    others = [f"sparse/{m}" for m in METRICS if m != "grad" and f"sparse/{m}" in ta.rows]
    best = max(others, key=lambda r: ta.averages()[r], default=None)
    parts1 = []
    if best is not None:
        parts1.append(part(f"grad on par with the best other metric ({best.split('/')[1]})", "sparse/grad", best,
                           compare(ta, [("sparse/grad", best)]), at_least_as_good))
    for weak in ("magnitude", "random"):
        parts1.append(part(f"grad clearly above {weak}", "sparse/grad", f"sparse/{weak}",
                           compare(ta, [("sparse/grad", f"sparse/{weak}")]), clearly_better))
    out = [claim(1, "a plain gradient metric is on par with the best salience metric; magnitude and random masks "
                    "are clearly worse", parts1)]
    if b is not None and len(b):
        static = a[(a["method.name"] == "sparse") & a["metric.name"].isin(SCHEDULE_METRICS)]
        tb = pivot(pd.concat([b, static[static["task.name"].isin(b["task.name"].unique())]]),
                   rows=["metric.name", "mask.name", "mask.selection"], interval="ci95", filters=only)
        dyn = [(f"{m}/static/global", f"{m}/dynamic/global") for m in SCHEDULE_METRICS]
        loc = [(f"{m}/static/global", f"{m}/static/local") for m in SCHEDULE_METRICS]
        out.append(claim(2, "a static mask is as good as a dynamic one (the study's re-selection)",
                         [part("static vs dynamic (global), grad and fisher", "static", "dynamic", compare(tb, dyn),
                               at_least_as_good)]))
        out.append(claim(3, "global top-k is at least as good as per-module (local) top-k, static masks",
                         [part("global vs local (static), grad and fisher", "global", "local", compare(tb, loc),
                               at_least_as_good)]))
    else:
        out += [claim(2, "a static mask is as good as a dynamic one", []),
                claim(3, "global top-k is at least as good as local top-k", [])]
    out.append(claim(4, "gradient-salience sparse fine-tuning is at least as good as LoRA at the same count",
                     [part("sparse/grad vs LoRA", "sparse/grad", "lora", compare(ta, [("sparse/grad", "lora")]),
                           at_least_as_good)]))
    return out


def part(name: str, row: str, reference: str, p: Paired, rule) -> dict:
    return {"part": name, "row": row, "reference": reference, "pairs": p.n, "mean": p.mean, "lo": p.lo,
            "hi": p.hi, "p": p.p, "rule": rule.__name__, "verdict": rule(p)}


def claim(number: int, text: str, parts: list[dict]) -> dict:
    return {"claim": number, "text": text, "verdict": combine([p["verdict"] for p in parts]), "parts": parts}


def markdown(results: list[dict], tasks: list[str], provisional: str | None = None) -> str:
    fmt = lambda x: "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"  # noqa: E731
    lines = [f"**Provisional**: {provisional}; every verdict is recomputed when the stage is complete.", ""] \
        if provisional else []
    lines += [f"Verdicts over the separating tasks ({', '.join(tasks) or 'none'}); rules and margin ({MARGIN:g} point) "
             "in `verdicts.py`, fixed before Table A was run.", "",
             "| claim | verdict | comparison | pairs | mean difference | 95 % bootstrap CI | p (sign-flip) |",
             "|---|---|---|---:|---:|---|---:|"]
    for c in results:
        if not c["parts"]:
            lines.append(f"| {c['claim']}. {c['text']} | **{c['verdict']}** | (no runs yet) | | | | |")
        for i, p in enumerate(c["parts"]):
            head = f"{c['claim']}. {c['text']} | **{c['verdict']}**" if i == 0 else " | "
            ci = "—" if not p["pairs"] else f"[{fmt(p['lo'])}, {fmt(p['hi'])}]"
            pv = "—" if not p["pairs"] else f"{p['p']:.3g}"
            lines.append(f"| {head} | {p['part']}: {p['verdict']} | {p['pairs']} | {fmt(p['mean'])} | {ci} | {pv} |")
    return "\n".join(lines) + "\n"


def write(out: Path, a: pd.DataFrame, b: pd.DataFrame | None, tasks: list[str],
          provisional: str | None = None) -> list[dict]:
    """``provisional``: why the verdicts may still change (e.g. Table A lacks seeds); None once the runs are all in."""
    results = claims(a, b, tasks) if tasks else []
    (out / "verdicts.json").write_text(json.dumps({"tasks": tasks, "margin": MARGIN, "provisional": provisional,
                                                   "claims": results}, indent=1, default=float) + "\n")
    (out / "verdicts.md").write_text(markdown(results, tasks, provisional) if tasks else
                                     "No task separates yet: no verdict (see separation.md).\n")
    return results
