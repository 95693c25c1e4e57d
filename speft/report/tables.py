"""The study's table: rows = methods or metrics, columns = tasks, cells = mean ± std (or a 95 % t interval)
over seeds; optionally each row's paired difference from a reference row (:func:`paired_rows`).

:func:`pivot` turns the collected records (:func:`speft.report.collect.load_records`) into a
:class:`Table`; :func:`to_markdown`, :func:`to_latex` and :func:`to_csv` render it. Nothing is dropped
silently: a cell without runs reads "—", a cell whose runs all failed "failed (k/n)", a cell with some
failures says so next to its mean, and the footer lists every failed run with its error.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from speft.config import NON_COMPUTING_KEYS
from speft.report import stats
from speft.report.collect import (
    SALIENCE_GROUPS,
    ReportError,
    apply_filters,
    check_keys,
    natural_key,
    uses_salience,
    without_debug,
)
from speft.results import LOWER_IS_BETTER, higher_is_better

DEFAULT_ROWS = ("method.name", "metric.name")
DEFAULT_COLS = ("task.name",)
# Added to the default rows when they take more than one value in the data: otherwise runs that differ
# in them would be averaged as if they were seeds.
FACTORS = ("mask.name", "mask.selection", "budget", "model.name")
MISSING = "—"
AVERAGE = "Average"
INTERVALS = {"std": "sample std", "ci95": "95 % t interval of the mean"}  # what a cell's ± shows


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)  # scaled main-metric values of completed runs
    seeds: list[Any] = field(default_factory=list)
    failed: int = 0
    running: int = 0
    no_value: int = 0  # completed, but the metric is missing or NaN

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def total(self) -> int:
        return self.n + self.failed + self.running + self.no_value

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1), 0 for a single run."""
        if self.n < 2:
            return 0.0 if self.n else math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def ci95(self) -> float:
        """Half-width of the 95 % t confidence interval of the mean (NaN below two runs)."""
        return stats.t_halfwidth(self.values)


@dataclass
class Table:
    row_keys: list[str]
    col_keys: list[str]
    rows: list[str]  # row labels, in order
    cols: list[str]  # column labels, in order
    row_values: dict[str, tuple]  # label -> the row keys' values
    cells: dict[tuple[str, str], Cell]
    metrics: dict[str, list[str]]  # column -> the metric keys its cells report
    value: str  # "final" or "best"
    scale: float
    digits: int
    average: bool = True
    interval: str = "std"  # the ± of a cell: a key of INTERVALS
    failures: list[str] = field(default_factory=list)  # one line per failed run
    notes: list[str] = field(default_factory=list)  # warnings and explanations for the footer

    def cell(self, row: str, col: str) -> Cell:
        return self.cells.get((row, col), Cell())

    def averages(self) -> dict[str, float]:
        """Per row: the mean over columns of the cell means; NaN when a column has no mean."""
        out = {}
        for r in self.rows:
            means = [self.cell(r, c).mean for c in self.cols]
            out[r] = sum(means) / len(means) if means and not any(math.isnan(m) for m in means) else math.nan
        return out

    def best(self) -> dict[str, set[str]]:
        """Per column (and ``Average``): the rows with the best mean, the highest or, for a metric where lower
        is better (``nll``), the lowest (ties all marked). Columns mixing both directions mark none."""
        columns = {c: {r: self.cell(r, c).mean for r in self.rows} for c in self.cols}
        signs = {c: {higher_is_better(k) for k in self.metrics.get(c, [])} or {True} for c in self.cols}
        if self.average:
            columns[AVERAGE] = self.averages()
            signs[AVERAGE] = set.union(*signs.values()) if signs else {True}
        out = {}
        for c, means in columns.items():
            if len(signs[c]) > 1:
                out[c] = set()
                continue
            sign = 1 if signs[c].pop() else -1
            finite = [sign * m for m in means.values() if not math.isnan(m)]
            top = max(finite, default=math.nan)
            out[c] = {r for r, m in means.items() if not math.isnan(m) and sign * m >= top - 1e-12}
        return out

    @property
    def uniform_n(self) -> int | None:
        """The number of values per cell when every non-empty cell has the same, else None."""
        ns = {cell.n for cell in self.cells.values() if cell.n}
        return ns.pop() if len(ns) == 1 else None

    def text(self, row: str, col: str) -> str:
        """The plain cell text: ``81.23 ± 0.45``, ``… (n=2, 1 failed)``, ``failed (1/1)`` or ``—``."""
        cell = self.cell(row, col)
        if not cell.total:
            return MISSING
        notes = []
        if cell.n and self.uniform_n is None:
            notes.append(f"n={cell.n}")
        for count, word in ((cell.failed, "failed"), (cell.running, "running"), (cell.no_value, "no value")):
            if count and cell.n:
                notes.append(f"{count} {word}")
        if not cell.n:
            parts = [f"{w} ({k}/{cell.total})" for k, w in ((cell.failed, "failed"), (cell.running, "running"),
                                                             (cell.no_value, "no value")) if k]
            return ", ".join(parts)
        text = self.number(cell.mean)
        if cell.n > 1:
            text += f" ± {self.number(getattr(cell, self.interval))}"
        return text + (f" ({', '.join(notes)})" if notes else "")

    def to_frame(self, what: str = "text") -> pd.DataFrame:
        """Rows × columns as a DataFrame: the cell ``text`` (with the ``Average`` column), or ``mean``,
        ``std``, ``ci95`` or ``n`` (numbers: NaN for empty cells)."""
        if what == "text":
            data = {self.header(c): [self.text(r, c) for r in self.rows] for c in self.cols}
            if self.average:
                data[AVERAGE] = [self.average_text(r) for r in self.rows]
        else:
            data = {self.header(c): [getattr(self.cell(r, c), what) for r in self.rows] for c in self.cols}
        return pd.DataFrame(data, index=pd.Index(self.rows, name=", ".join(self.row_keys)))

    def average_text(self, row: str) -> str:
        m = self.averages()[row]
        return MISSING if math.isnan(m) else self.number(m)

    def number(self, x: float) -> str:
        return f"{x:.{self.digits}f}"

    def header(self, col: str) -> str:
        """The column label, with its metric when it reports a single one (``glue/sst2 (accuracy)``)."""
        metrics = self.metrics.get(col, [])
        if len(metrics) == 1:
            return f"{col} ({metrics[0].split('/')[-1]})"
        return col

    def footer(self) -> list[str]:
        what = "best-epoch" if self.value == "best" else "final"
        scale = f" × {self.scale:g}" if self.scale != 1 else ""
        n = self.uniform_n
        spread = ("one run each" if n == 1 else
                  f"mean ± {INTERVALS[self.interval]} over seeds ({f'n={n} each' if n else 'n: runs per cell'}; "
                  f"no ± for a single run)")
        lines = [f"Cells: {what} metric{scale}, {spread}; "
                 f"rows: {', '.join(self.row_keys)}; columns: {', '.join(self.col_keys)}."]
        metrics = sorted({m for ms in self.metrics.values() for m in ms})
        if metrics:
            lines.append(f"Metrics: {', '.join(metrics)}.")
        if self.average:
            lines.append(f"{AVERAGE}: mean of a row's cells, when every column has one. Bold: the best per column "
                         f"(the lowest for {', '.join(sorted(LOWER_IS_BETTER))}).")
        lines += self.notes
        if self.failures:
            lines.append(f"Failed runs ({len(self.failures)}):")
            lines += [f"- {f}" for f in self.failures]
        return lines


# ----------------------------------------------------------------------------------------------


def run_value(rec: pd.Series, value: str = "final", metric: str | None = None) -> tuple[str | None, float]:
    """(metric key, value) of one record: the task's main metric (or ``metric``: a bare name such as
    ``f1`` is read on the task's validation split) from the final or the best-epoch evaluation."""
    if metric:
        key = metric if "/" in metric else f"{rec.get('validation_split') or 'validation'}/{metric}"
    else:
        key = rec.get("main_metric")
    source = rec["best_metrics"] if value == "best" else rec["metrics"]
    v = source.get(key) if key else None
    return key, (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)


def default_rows(df: pd.DataFrame) -> list[str]:
    """``method.name, metric.name`` plus every factor of :data:`FACTORS` that varies in the data."""
    rows = [k for k in DEFAULT_ROWS if k in df.columns]
    salience = df[df["salience"].map(uses_salience)]
    for key in FACTORS:
        if key not in df.columns:
            continue
        scope = salience if key.startswith(SALIENCE_GROUPS) else df
        if scope[key].dropna().map(str).nunique() > 1:
            rows.append(key)
    return rows


def row_label(rec: pd.Series, keys: list[str]) -> tuple[str, tuple]:
    """Label and key values of a record's row; metric and mask keys are left out for methods without a
    salience mask (LoRA is "lora", not "lora/grad")."""
    salience = uses_salience(rec.get("salience"))
    values = tuple(None if (not salience and k.startswith(SALIENCE_GROUPS)) else rec.get(k) for k in keys)
    parts = [str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not parts and not salience:  # rows by metric only: a baseline is its method ("lora")
        parts = [str(rec.get("method.name"))]
    debug = " (debug)" if rec.get("debug_run") is True else ""  # debug runs are shown only when asked for
    return ("/".join(parts) or "(none)") + debug, values


def col_label(rec: pd.Series, keys: list[str]) -> str:
    return "/".join(str(rec.get(k)) for k in keys)


def pivot(df: pd.DataFrame, rows: list[str] | None = None, cols: list[str] | None = None, value: str = "final",
          metric: str | None = None, scale: float = 100.0, filters: list[str] = (), digits: int | None = None,
          average: bool = True, interval: str = "std", include_debug: bool = False) -> Table:
    """The table of ``df``'s runs (see the module docstring). ``rows``/``cols``: dotted keys (default
    :func:`default_rows` and ``task.name``); ``value``: ``final`` or ``best``; ``metric``: instead of each
    task's main metric; ``filters``: ``key=value`` strings; ``scale``: 100 for percent."""
    if value not in ("final", "best"):
        raise ReportError(f"--value {value!r}: choose final or best")
    if interval not in INTERVALS:
        raise ReportError(f"--interval {interval!r}: choose {' or '.join(INTERVALS)}")
    df, left_out = without_debug(apply_filters(df, filters), include_debug)
    if df.empty:
        raise ReportError(f"no runs left after the filters {', '.join(filters)}"
                          + (f" ({left_out} debug runs left out: --include-debug shows them)" if left_out else ""))
    rows = list(rows) if rows else default_rows(df)
    cols = list(cols) if cols else list(DEFAULT_COLS)
    check_keys(df, rows, "--rows")
    check_keys(df, cols, "--cols")

    labels = df.apply(lambda rec: row_label(rec, rows), axis=1, result_type="expand")
    keys = df.apply(lambda rec: run_value(rec, value, metric), axis=1, result_type="expand")
    long = pd.DataFrame({"row": labels[0], "row_values": labels[1], "col": df.apply(col_label, axis=1, keys=cols),
                         "status": df["status"], "key": keys[0], "value": keys[1].astype(float) * scale,
                         "seed": df["seed"], "run": df["run"], "error": df["error"]})
    # Salience methods first (the study's rows), then the baselines; natural order within each.
    salient = dict(zip(long["row"], df["salience"].map(uses_salience)))
    row_order = sorted(long["row"].unique(), key=lambda r: (not salient[r], natural_key(r)))
    col_order = sorted(long["col"].unique(), key=natural_key)
    done = long["status"] == "completed"
    flags = long.assign(ok=done & long["value"].notna(), no_value=done & long["value"].isna(),
                        failed=long["status"] == "failed", running=~long["status"].isin(["completed", "failed"]))
    cells = {(r, c): Cell(values=g.loc[g["ok"], "value"].tolist(), seeds=g.loc[g["ok"], "seed"].tolist(),
                          failed=int(g["failed"].sum()), running=int(g["running"].sum()),
                          no_value=int(g["no_value"].sum()))
             for (r, c), g in flags.groupby(["row", "col"], sort=False)}

    table = Table(row_keys=rows, col_keys=cols, rows=row_order, cols=col_order,
                  row_values=dict(zip(long["row"], long["row_values"])), cells=cells,
                  metrics={c: sorted({k for k in long.loc[long["col"] == c, "key"] if isinstance(k, str)})
                           for c in col_order},
                  value=value, scale=scale, digits=digits if digits is not None else (2 if scale >= 100 else 4),
                  average=average, interval=interval)
    for _, x in long[long["status"] == "failed"].iterrows():
        error = x["error"] or "no error recorded"
        error = error if len(error) <= 300 else error[:299] + "…"
        table.failures.append(f"{x['row']} · {x['col']} · seed {x['seed']}: {error} ({x['run']})")
    running = long[~long["status"].isin(["completed", "failed"])]
    if len(running):
        table.notes.append(f"Not finished ({len(running)}): " + ", ".join(sorted(running["run"])))
    no_value = long[(long["status"] == "completed") & long["value"].isna()]
    if len(no_value):
        keys = sorted({str(k) for k in no_value["key"]})
        table.notes.append(f"Completed without a value for {', '.join(keys)} ({len(no_value)} runs; a NaN metric "
                           f"or a key this run does not report; see --metric): " + ", ".join(sorted(no_value["run"])))
    table.notes += mixed_cell_notes(df, long, rows, cols)
    if left_out:
        table.notes.append(f"Left out: {left_out} debug runs (debug=fast; --include-debug shows them, marked).")
    return table


def mixed_cell_notes(df: pd.DataFrame, long: pd.DataFrame, rows: list[str], cols: list[str]) -> list[str]:
    """Warn about cells holding two completed runs of the same seed: they differ in some other key that
    should be a row, a column or a filter, or the same run was collected twice."""
    done = long[long["status"] == "completed"]
    ignore = {"run", "status", "error", "metrics", "best_metrics", "mask_modules", "mask_final_modules",
              "paths.data_dir", "paths.cache_dir", "scoring.path", "scoring.cache", "trainable_fraction",
              "trainable_params", "total_params", "train_steps", "logger.name", *NON_COMPUTING_KEYS}
    ignore |= {c for c in df.columns if c.startswith(("timings.", "peak_memory_mb."))}
    notes = []
    for (r, c), group in done.groupby(["row", "col"], sort=False):
        seeds = group["seed"].map(str)
        if seeds.nunique() == len(seeds):
            continue
        runs = df[df["run"].isin(group["run"])]
        differ = [k for k in df.columns if k not in ignore and k not in rows and k not in cols
                  and runs[k].map(str).nunique() > 1]
        why = (f"they differ in {', '.join(differ)}: add one to --rows or --filter" if differ
               else "the same run collected twice?")
        notes.append(f"Warning: cell {r} · {c} averages {len(group)} runs over only {seeds.nunique()} seed(s) ({why}).")
    return notes


# ----------------------------------------------------------------------------------------------
# Rendering


def _grid(table: Table) -> tuple[list[str], list[list[str]], dict[str, set[str]]]:
    header = [", ".join(table.row_keys), *[table.header(c) for c in table.cols]]
    if table.average:
        header.append(AVERAGE)
    body = []
    for r in table.rows:
        line = [r, *[table.text(r, c) for c in table.cols]]
        if table.average:
            line.append(table.average_text(r))
        body.append(line)
    return header, body, table.best()


def markdown_table(header: list[str], body: list[list[str]], numeric: list[bool]) -> str:
    """The one Markdown table writer (the study's table, cost tables, overlap tables); numeric columns
    are right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(t).replace("|", "\\|") for t in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_markdown(table: Table) -> str:
    header, body, best = _grid(table)
    cols = [*table.cols, AVERAGE] if table.average else list(table.cols)
    body = [[line[0]] + [f"**{t}**" if r in best.get(c, ()) else t for c, t in zip(cols, line[1:])]
            for r, line in zip(table.rows, body)]
    text = markdown_table(header, body, [False] + [True] * (len(header) - 1))
    return text + "\n".join([""] + table.footer()) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "—": "---", "±": r"$\pm$", "×": r"$\times$", "·": r"$\cdot$", "ρ": r"$\rho$"}


def latex_escape(s: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in str(s))


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); the footer as ``%`` comments."""
    header, body, best = _grid(table)
    cols = [*table.cols, AVERAGE] if table.average else list(table.cols)
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for r, line in zip(table.rows, body):
        out = [latex_escape(line[0])]
        for c, t in zip(cols, line[1:]):
            out.append(rf"\textbf{{{latex_escape(t)}}}" if r in best.get(c, ()) else latex_escape(t))
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += ["% " + line.replace("\n", " ") for line in table.footer()]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("row", "column", "metric", "mean", "std", "ci95", "n", "failed", "running", "no_value", "best", "text")


def to_csv(table: Table) -> str:
    """Long form, one line per cell (and per row's ``Average``): the row keys' values, the numbers at full
    precision (scaled), the counts and ``best`` (1 for the best entry of its column)."""
    best = table.best()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.row_keys, *CSV_FIELDS])
    for r in table.rows:
        keys = ["" if v is None else v for v in table.row_values.get(r, ())]
        for c in table.cols:
            cell = table.cell(r, c)
            writer.writerow([*keys, r, c, ";".join(table.metrics.get(c, [])), _num(cell.mean), _num(cell.std),
                             _num(cell.ci95), cell.n, cell.failed, cell.running, cell.no_value,
                             int(r in best.get(c, ())), table.text(r, c)])
        if table.average:
            m = table.averages()[r]
            writer.writerow([*keys, r, AVERAGE, "", _num(m), "", "", "", "", "", "", int(r in best.get(AVERAGE, ())),
                             table.average_text(r)])
    return buf.getvalue()


def _num(x: float) -> str:
    return "" if x is None or math.isnan(x) else repr(float(x))


# ----------------------------------------------------------------------------------------------
# Paired comparison with a reference row


@dataclass
class PairedRow:
    row: str
    overall: stats.Paired  # over every matched (column, seed) pair
    by_col: dict[str, float]  # column -> mean difference over its matched seeds (NaN: no pair)


def matched_differences(table: Table, row: str, reference: str, col: str) -> list[float]:
    """``row`` minus ``reference`` for each seed with a value in both cells of column ``col``."""
    ref = dict(zip(map(str, table.cell(reference, col).seeds), table.cell(reference, col).values))
    cell = table.cell(row, col)
    return [v - ref[s] for s, v in zip(map(str, cell.seeds), cell.values) if s in ref]


def paired_rows(table: Table, reference: str) -> list[PairedRow]:
    """Each other row's difference from ``reference`` over matched (column, seed) pairs: mean, 95 % bootstrap
    interval and sign-flip p-value (:func:`speft.report.stats.paired`), and per column the mean difference."""
    if reference not in table.rows:
        raise ReportError(f"--paired {reference!r} is not a row; rows: {', '.join(table.rows)}")
    out = []
    for row in table.rows:
        if row == reference:
            continue
        per_col = {c: matched_differences(table, row, reference, c) for c in table.cols}
        pooled = [d for c in table.cols for d in per_col[c]]
        out.append(PairedRow(row, stats.paired(pooled),
                             {c: sum(d) / len(d) if d else math.nan for c, d in per_col.items()}))
    return out


def _signed(x: float, digits: int) -> str:
    return MISSING if math.isnan(x) else f"{x:+.{digits}f}"


def _paired_grid(table: Table, rows: list[PairedRow]) -> tuple[list[str], list[list[str]]]:
    num = functools.partial(_signed, digits=table.digits)
    header = [", ".join(table.row_keys), "pairs", "mean difference", "95 % bootstrap CI", "p (sign-flip)",
              *[table.header(c) for c in table.cols]]
    body = [[r.row, str(r.overall.n), num(r.overall.mean),
             MISSING if not r.overall.n else f"[{num(r.overall.lo)}, {num(r.overall.hi)}]",
             MISSING if not r.overall.n else f"{r.overall.p:.3g}", *[num(r.by_col[c]) for c in table.cols]]
            for r in rows]
    return header, body


def paired_footer(reference: str) -> list[str]:
    return [f"Paired differences from {reference} (row minus {reference}) over (column, seed) pairs run by both: "
            f"their mean, a 95 % percentile bootstrap interval ({stats.BOOTSTRAP_RESAMPLES:,} resamples of the "
            f"pairs) and the two-sided sign-flip permutation p-value (exact up to {stats.EXACT_MAX} pairs); then "
            f"each column's mean difference. Seeded: the numbers are reproducible."]


def paired_markdown(table: Table, reference: str) -> str:
    header, body = _paired_grid(table, paired_rows(table, reference))
    text = markdown_table(header, body, [False] + [True] * (len(header) - 1))
    return text + "\n" + "\n".join(paired_footer(reference)) + "\n"


def paired_latex(table: Table, reference: str) -> str:
    header, body = _paired_grid(table, paired_rows(table, reference))
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(t) for t in line) + r" \\" for line in body]
    lines += [r"\bottomrule", r"\end{tabular}"] + ["% " + line for line in paired_footer(reference)]
    return "\n".join(lines) + "\n"


PAIRED_FIELDS = ("row", "reference", "column", "pairs", "mean_difference", "ci_low", "ci_high", "p_sign_flip",
                 "p_exact")


def paired_csv(table: Table, reference: str) -> str:
    """Long form: per row, one line over all pairs (column ``all``) and one per column (mean difference)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PAIRED_FIELDS)
    for r in paired_rows(table, reference):
        o = r.overall
        writer.writerow([r.row, reference, "all", o.n, _num(o.mean), _num(o.lo), _num(o.hi), _num(o.p), int(o.exact)])
        for c in table.cols:
            n = len(matched_differences(table, r.row, reference, c))
            writer.writerow([r.row, reference, c, n, _num(r.by_col[c]), "", "", "", ""])
    return buf.getvalue()
