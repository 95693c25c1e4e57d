"""The study's figures from collected runs (:func:`speft.report.collect.load_records`).

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state: it works
the same in a script, a test and a notebook, where the last expression of a cell displays it); :func:`save`
writes it as PNG and PDF and :func:`write_figures` writes every figure the data supports.

* :func:`density_sweep`: main metric vs trainable fraction (log x), one line per method, error bars
  over seeds, one panel per task;
* :func:`mask_bars`: static vs dynamic masks × global vs local selection, grouped bars per task
  (averaged over metrics, or per metric);
* :func:`mask_heatmap`: density of the selected mask per layer × projection;
* :func:`overlap_heatmap`: IoU (or Spearman ρ) between metrics' selections, from an overlap JSON
  (``python -m speft.report.overlap --json``) or from the runs' score files (:func:`overlap_from_records`);
* :func:`efficiency_bars`: step time and peak memory relative to LoRA (``speft.report.efficiency``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from speft.report.collect import ReportError, apply_filters, is_debug, natural_key, uses_salience, without_debug
from speft.report.tables import default_rows, row_label, run_value

FORMATS = ("png", "pdf")
READABLE = {"method.name": "method", "metric.name": "metric", "mask.name": "mask", "mask.selection": "selection",
            "trainer.lr": "learning rate", "budget": "budget", "model.name": "model", "task.name": "task",
            "trainer.head_warmup_steps": "head warm-up steps"}  # axis and legend names for config keys


def plt_colour(i: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def save(fig: Figure, stem: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` (parent folders created); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def values_frame(df: pd.DataFrame, value: str = "final", metric: str | None = None, scale: float = 100.0,
                 filters: Iterable[str] = (), include_debug: bool = False) -> pd.DataFrame:
    """The completed runs with a finite main-metric value, as ``df`` plus a ``value`` column (scaled); debug runs
    only with ``include_debug`` (their labels say "(debug)")."""
    df = without_debug(apply_filters(df, filters), include_debug)[0]
    df = df[df["status"] == "completed"].copy()
    df["value"] = [run_value(rec, value, metric)[1] * scale for _, rec in df.iterrows()]
    return df[df["value"].notna()]


def _panels(n: int, width: float = 4.2, height: float = 3.4, ncols: int | None = None) -> tuple[Figure, list]:
    ncols = min(n, ncols or 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _ylabel(value: str, scale: float, metric: str | None) -> str:
    what = metric or "main metric"
    return f"{'best-epoch' if value == 'best' else 'final'} {what}" + (" (%)" if scale == 100 else "")


def _sem(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Density sweep


def density_sweep(df: pd.DataFrame, rows: list[str] | None = None, value: str = "final", metric: str | None = None,
                  scale: float = 100.0, filters: Iterable[str] = (), x: str = "trainable_fraction",
                  include_debug: bool = False) -> Figure:
    """Main metric vs the trainable fraction of the target entries (log x), one line per row label
    (default: method and metric, and the mask factors that vary; not the budget, which is the x axis),
    mean over seeds with ±1 std error bars; one panel per task."""
    return sweep_curves(df, x, "trainable fraction of the target weights", rows, value, metric, scale, filters,
                        leave_out=("budget", "density"), include_debug=include_debug)


def lr_sweep(df: pd.DataFrame, rows: list[str] | None = None, value: str = "final", metric: str | None = None,
             scale: float = 100.0, filters: Iterable[str] = (), include_debug: bool = False) -> Figure:
    """Main metric vs the learning rate (log x), one line per method: how much a verdict depends on the step."""
    return sweep_curves(df, "trainer.lr", "learning rate", rows, value, metric, scale, filters,
                        leave_out=("trainer.lr",), include_debug=include_debug)


def sweep_curves(df: pd.DataFrame, x: str, xlabel: str, rows: list[str] | None, value: str, metric: str | None,
                 scale: float, filters: Iterable[str], leave_out: tuple[str, ...] = (),
                 include_debug: bool = False) -> Figure:
    """The main metric against the numeric key ``x`` (log scale), one line per row label, mean over seeds
    (±1 std error bars where a point has more than one run); one panel per task."""
    data = values_frame(df, value, metric, scale, filters, include_debug)
    data = data[data[x].notna()] if x in data else data.iloc[0:0]
    if data.empty:
        raise ReportError(f"no completed run with a value and a '{x}' to plot")
    rows = rows or [k for k in default_rows(data) if k not in leave_out]
    data["label"] = [row_label(rec, rows)[0] for _, rec in data.iterrows()]
    labels = sorted(data["label"].unique(), key=lambda r: (not r.startswith("sparse"), natural_key(r)))
    # the same line colour in every panel; past ten lines, tab20's colours and dashes keep them apart
    palette = [f"C{i}" for i in range(10)] if len(labels) <= 10 else [plt_colour(i) for i in range(20)]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    styles = {label: "-" if i < len(palette) else "--" for i, label in enumerate(labels)}
    tasks = sorted(data["task.name"].unique(), key=natural_key)
    fig, axes = _panels(len(tasks))
    several = False
    for ax, task in zip(axes, tasks):
        sub = data[data["task.name"] == task]
        for label in labels:
            if not (sub["label"] == label).any():
                continue
            points = (sub[sub["label"] == label].groupby(x).agg(y=("value", "mean"), err=("value", _sem),
                                                                n=("value", "size")).sort_index())
            several |= bool((points["n"] > 1).any())
            ax.errorbar(points.index, points["y"], yerr=points["err"] if (points["n"] > 1).any() else None,
                        marker="o", capsize=3, label=label, color=colours[label], linestyle=styles[label])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_ylabel(value, scale, metric))
        ax.grid(alpha=0.3, which="both")
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    shown = [label for label in labels if label in handles]
    title = " / ".join(READABLE.get(k, k) for k in rows) + ("\n(bars: ±1 std over seeds)" if several else "")
    fig.legend([handles[label] for label in shown], shown, loc="outside right upper", fontsize="small", title=title)
    return fig


# ----------------------------------------------------------------------------------------------
# Static vs dynamic × global vs local


def mask_bars(df: pd.DataFrame, average_metrics: bool = True, value: str = "final", metric: str | None = None,
              scale: float = 100.0, filters: Iterable[str] = (), include_debug: bool = False) -> Figure:
    """Grouped bars per task. ``average_metrics``: one group per mask schedule (``mask.name``), one bar per
    selection (``mask.selection``), the mean over salience metrics of their seed means (error bars: std
    over metrics, or over seeds when there is one metric). Else one group per metric and one bar per
    schedule/selection pair (error bars: std over seeds)."""
    data = values_frame(df, value, metric, scale, filters, include_debug)
    data = data[data["salience"].map(uses_salience)]
    if data.empty:
        raise ReportError("no completed sparse (salience) run to compare masks")
    tasks = sorted(data["task.name"].unique(), key=natural_key)
    fig, axes = _panels(len(tasks), width=4.8 if average_metrics else 6.5)
    for ax, task in zip(axes, tasks):
        sub = data[data["task.name"] == task]
        seed_means = (sub.groupby(["metric.name", "mask.name", "mask.selection"])["value"]
                      .agg(mean="mean", std=_sem).reset_index())
        if average_metrics:
            metrics = seed_means["metric.name"].nunique()
            if metrics > 1:
                bars = seed_means.groupby(["mask.name", "mask.selection"])["mean"].agg(mean="mean", std=_sem)
                what, spread = f"mean of {metrics} metrics", "± std over metrics"
            else:
                bars = seed_means.set_index(["mask.name", "mask.selection"])[["mean", "std"]]
                what, spread = seed_means["metric.name"].iloc[0], "± std over seeds"
            groups, hue = "mask.name", "mask.selection"
        else:
            bars = seed_means.assign(pair=seed_means["mask.name"] + "/" + seed_means["mask.selection"])
            bars = bars.set_index(["metric.name", "pair"])[["mean", "std"]]
            what, spread = "", "± std over seeds"
            groups, hue = "metric.name", "mask/selection"
            bars.index = bars.index.set_names(["metric.name", hue])
        drawn = _grouped(ax, bars, groups, hue)  # error bars only where n > 1
        note = ", ".join(t for t in (what, spread if drawn else "") if t)
        ax.set_title(f"{task}\n{note}" if note else task, fontsize="medium")
        ax.set_ylabel(_ylabel(value, scale, metric))
    return fig


def _grouped(ax, bars: pd.DataFrame, groups: str, hue: str) -> bool:
    """Bars of ``bars`` (index: group, hue; columns mean, std) grouped by the index's first level; returns
    whether error bars were drawn (only where something varies)."""
    group_names = sorted(bars.index.get_level_values(0).unique(), key=natural_key)
    hue_names = sorted(bars.index.get_level_values(1).unique(), key=natural_key)
    width = 0.8 / len(hue_names)
    pos = np.arange(len(group_names))
    spread = bool((bars["std"].fillna(0) > 0).any())  # error bars only where something varies (n > 1)
    for i, h in enumerate(hue_names):
        means = [bars["mean"].get((g, h), np.nan) for g in group_names]
        stds = [bars["std"].get((g, h), np.nan) for g in group_names] if spread else None
        ax.bar(pos + (i - (len(hue_names) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=h)
    rotated = len(group_names) > 4
    ax.set_xticks(pos, group_names, rotation=30 if rotated else 0)
    ax.set_xlabel(READABLE.get(groups, groups))
    ax.set_ylim(bottom=0)  # bars start at zero: their lengths compare
    ax.legend(title=READABLE.get(hue, hue), fontsize="small", loc="upper center",
              bbox_to_anchor=(0.5, -0.4 if rotated else -0.25), ncols=min(len(hue_names), 4),
              frameon=False)  # below the axes: it covers no bar
    ax.grid(axis="y", alpha=0.3)
    return spread


# ----------------------------------------------------------------------------------------------
# Per-module mask density

LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.(.+)$")
PREFIXES = ("attention.self.", "self_attn.", "self_attention.", "attn.", "mlp.")


def parse_module(name: str) -> tuple[int | None, str]:
    """(layer index, projection) of a target module's name: ``bert.encoder.layer.3.attention.self.query``
    -> (3, "query"), ``...layer.3.attention.output.dense`` -> (3, "attention.output"), ``...layer.3.output.dense``
    -> (3, "output"), ``model.layers.3.self_attn.q_proj`` -> (3, "q_proj"), ``...mlp.down_proj`` ->
    (3, "down_proj"). A name without a layer index gives (None, name)."""
    m = LAYER.search(name)
    if not m:
        return None, name
    proj = m.group(2)
    if proj.endswith(".dense"):
        proj = proj[: -len(".dense")]
    for prefix in PREFIXES:
        if proj.startswith(prefix):
            proj = proj[len(prefix):]
            break
    return int(m.group(1)), proj


PROJECTIONS = ("query", "key", "value", "attention.output", "intermediate", "output",  # BERT
               "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def projection_key(name: str) -> tuple:
    """Projections in the model's order (query, key, value, then the MLP), unknown ones after, by name."""
    return (PROJECTIONS.index(name), "") if name in PROJECTIONS else (len(PROJECTIONS), name)


def module_density(masks: Iterable[dict]) -> pd.DataFrame:
    """Layers × projections: mean over the given masks (``{module: {"selected", "total"}}``) of each
    module's selected fraction. Modules without a layer index form a row ``other``."""
    records = []
    for mask in masks:
        for name, m in mask.items():
            layer, proj = parse_module(name)
            records.append({"layer": "other" if layer is None else layer, "projection": proj,
                            "density": m["selected"] / m["total"] if m.get("total") else np.nan})
    if not records:
        raise ReportError("no per-module mask in these runs (results.json 'mask': sparse runs only)")
    frame = pd.DataFrame.from_records(records)
    order = sorted(dict.fromkeys(frame["projection"]), key=projection_key)
    table = frame.pivot_table(index="layer", columns="projection", values="density", aggfunc="mean")
    layers = sorted(table.index, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0))
    return table.reindex(index=layers, columns=order)


def mask_heatmap(data: pd.DataFrame | dict, by: str | None = None, which: str = "mask_modules",
                 filters: Iterable[str] = (), annotate: bool | None = None) -> Figure:
    """Heatmap of the selected fraction per layer (rows) × projection (columns). ``data``: one mask
    dict, or collected runs (their ``which`` column: ``mask_modules`` at the start of training,
    ``mask_final_modules`` at the end), averaged per panel; ``by`` a key giving one panel per value
    (e.g. ``metric.name``). Colour scale shared by the panels; cells annotated in % when few."""
    if isinstance(data, dict):
        groups = [("mask", [data])]
    else:
        df = apply_filters(data, filters)
        df = df[(df["status"] == "completed") & df[which].map(bool)]
        if df.empty:
            raise ReportError(f"no completed run with a per-module mask ('{which}')")
        if by:
            groups = [(f"{READABLE.get(by, by)}: {k}", list(g[which])) for k, g in df.groupby(by, sort=False)]
            groups.sort(key=lambda t: natural_key(t[0]))
        else:
            groups = [(f"{len(df)} run(s)", list(df[which]))]
    tables = [(title, 100 * module_density(masks), len(masks)) for title, masks in groups]  # percent
    vmax = max(float(np.nanmax(t.to_numpy())) for _, t, _ in tables) or 100.0
    first = tables[0][1]
    fig, axes = _panels(len(tables), width=1.0 + 0.75 * first.shape[1], height=1.2 + 0.32 * first.shape[0],
                        ncols=4)
    image = None
    for ax, (title, table, n) in zip(axes, tables):
        image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right")
        ax.set_yticks(range(table.shape[0]), table.index)
        ax.set_xlabel("projection")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}" + (f" (mean of {n})" if n > 1 else ""), fontsize="medium")
        if annotate if annotate is not None else table.size <= 100:
            for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes, label="entries selected (%)")
    return fig


# ----------------------------------------------------------------------------------------------
# Overlap between metrics


def overlap_from_records(df: pd.DataFrame, density: Any = None, selection: str = "global",
                         filters: Iterable[str] = ()) -> dict:
    """The overlap record (:func:`speft.report.overlap.overlap_record`) of the metrics' score files
    named by completed runs (``scoring.path``; the first run per metric). The runs must share a task (add a
    filter such as ``task.name=glue/sst2``); ``density`` defaults to theirs."""
    from speft.report.overlap import load_input, overlap_record, parse_density  # torch: only when drawn

    df = apply_filters(df, filters)
    df = df[(df["status"] == "completed") & df["scoring.path"].map(lambda p: isinstance(p, str) and Path(p).exists())]
    if df.empty:
        raise ReportError("no completed run whose score file (scoring.path) exists: score files live in the "
                          "score cache (metric.cache=true); or give an overlap JSON (overlap --json)")
    tasks = sorted(df["task.name"].unique())
    if len(tasks) > 1:
        raise ReportError(f"runs of several tasks ({', '.join(tasks)}): filter one, e.g. task.name={tasks[0]}")
    firsts = df.drop_duplicates("metric.name")
    if len(firsts) < 2:
        raise ReportError("the overlap needs score files of at least two metrics")
    if density is None:
        density = firsts["density"].iloc[0]
    density = density.item() if hasattr(density, "item") else density  # numpy scalar from the DataFrame
    density = parse_density(density) if isinstance(density, str) else density
    inputs = [load_input(Path(p)) for p in firsts["scoring.path"]]
    return overlap_record(inputs, density, selection, sources=list(firsts["scoring.path"]))


def find_overlap(results: str | Path) -> Path | None:
    """The overlap JSON that goes with a results folder: ``<results>/overlap.json`` or next to the folder
    (``<results>/../overlap.json``, where the mini-study keeps it); None when there is none."""
    if str(results).startswith("wandb:"):
        return None
    for path in (Path(results) / "overlap.json", Path(results).parent / "overlap.json"):
        if path.is_file():
            return path
    return None


def overlap_heatmap(source: str | Path | dict | pd.DataFrame, key: str = "iou", **kwargs) -> Figure:
    """Label × label heatmap of ``key`` (``iou``, ``spearman_mean`` or ``spearman_min``) from an overlap
    JSON file (``python -m speft.report.overlap --json``), its record (dict), or collected runs
    (computed from their score files by :func:`overlap_from_records`, ``kwargs`` passed on)."""
    from speft.report.overlap import read_json

    if isinstance(source, pd.DataFrame):
        record = overlap_from_records(source, **kwargs)
    elif isinstance(source, dict):
        record = source
    else:
        record = read_json(Path(source))
    labels, matrix = record["labels"], np.array(record[key], dtype=float)
    n = len(labels)
    fig = Figure(figsize=(1.6 + 0.8 * n, 1.2 + 0.7 * n), layout="constrained")
    ax = fig.subplots()
    lo = 0.0 if key == "iou" else -1.0
    image = ax.imshow(matrix, cmap="magma" if key == "iou" else "coolwarm", vmin=lo, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for (i, j), v in np.ndenumerate(matrix):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v < (lo + 1) / 2 + 0.2 else "black")
    title = {"iou": "IoU of selected sets", "spearman_mean": "Spearman ρ (mean over modules)",
             "spearman_min": "Spearman ρ (min over modules)"}.get(key, key)
    ax.set_title(f"{title}\ndensity {record.get('density')}, {record.get('selection', '')} selection",
                 fontsize="medium")
    fig.colorbar(image, ax=ax)
    return fig


# ----------------------------------------------------------------------------------------------
# Efficiency


def efficiency_bars(bench: pd.DataFrame) -> Figure:
    """Step time and peak memory of each method relative to LoRA (``speft.report.efficiency.load_bench``)."""
    from speft.report.efficiency import bench_table

    table = bench_table(bench)
    fig, axes = _panels(2, width=4.5)
    for ax, (col, label) in zip(axes, (("step_vs_lora", "step time × LoRA"), ("memory_vs_lora", "peak memory × LoRA"))):
        ax.bar(table["method"], table[col], color=["C1" if m == "lora" else "C0" for m in table["method"]])
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        for i, v in enumerate(table[col]):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    shape = bench["shape"].iloc[0] if "shape" in bench else ""
    fig.suptitle(f"training step, {shape}".strip(", "))
    return fig


# ----------------------------------------------------------------------------------------------


def write_figures(df: pd.DataFrame, out: str | Path, overlap: str | Path | None = None, value: str = "final",
                  metric: str | None = None, scale: float = 100.0, rows: list[str] | None = None,
                  filters: Iterable[str] = (), include_debug: bool = False) -> dict[str, list[Path] | str]:
    """Every figure the runs support, as ``<out>/<name>.png`` and ``.pdf``; returns name -> paths, or
    name -> the reason it was skipped (e.g. a single density: no sweep to plot).

    ``overlap``: an overlap JSON; without it the overlap figure is computed from the runs' score files
    when they still exist (one task). Debug runs only with ``include_debug`` (a figure holding any says so)."""
    out = Path(out)
    df = without_debug(apply_filters(df, filters), include_debug)[0]
    common = {"value": value, "metric": metric, "scale": scale, "include_debug": include_debug}
    done: dict[str, list[Path] | str] = {}
    attempt = functools.partial(_attempt, done, out, debug=bool(is_debug(df).any()))

    # The density sweep: the sparse runs of the mask schedule and selection with the most budgets (and the
    # baselines, whose mask settings are unused); other schedules would add one-point lines.
    sweep = df[(df["status"] == "completed") & df["salience"].map(uses_salience)]
    if len(sweep) and sweep.groupby("task.name")["budget"].nunique().max() > 1:
        counts = sweep.groupby(["mask.name", "mask.selection"])["budget"].nunique()
        name, selection = counts.idxmax()
        mask_filters = [f"mask.name={name}", f"mask.selection={selection}"]
        attempt("density_sweep", lambda: density_sweep(df, rows=rows, filters=mask_filters, **common))
    else:
        done["density_sweep"] = "skipped: one budget per task, no sweep"
    # Masks compared at one budget: the most common one.
    salience = df[df["salience"].map(uses_salience) & (df["status"] == "completed")]
    budget = salience["budget"].mode().iloc[0] if salience["budget"].notna().any() else None
    same_budget = [f"budget={budget}"] if budget is not None else []
    if len(salience) and salience[["mask.name", "mask.selection"]].drop_duplicates().shape[0] > 1:
        attempt("masks", lambda: mask_bars(df, average_metrics=True, filters=same_budget, **common))
        attempt("masks_by_metric", lambda: mask_bars(df, average_metrics=False, filters=same_budget, **common))
    else:
        done["masks"] = "skipped: a single mask schedule and selection"
    # Local selection gives every module the same density: the global masks are the informative ones; static
    # masks (dynamic ones have their own start and end) at that budget.
    heat = apply_filters(salience, same_budget)
    for key, preferred in (("mask.selection", "global"), ("mask.name", "static")):
        if len(heat) and not (heat[key] == preferred).any() and heat[key].notna().any():
            preferred = heat[key].mode().iloc[0]
        heat = heat[heat[key] == preferred]
    by = "metric.name" if "metric.name" in heat and heat["metric.name"].nunique() > 1 else None
    attempt("mask_density", lambda: mask_heatmap(heat, by=by))
    if overlap is not None:
        attempt("overlap", lambda: overlap_heatmap(overlap))
    else:
        tasks = sorted(df["task.name"].dropna().unique(), key=natural_key)
        attempt("overlap", lambda: overlap_heatmap(df, filters=[f"task.name={tasks[0]}"] if tasks else ()))
    return done


def _attempt(done: dict, out: Path, name: str, make, debug: bool) -> None:
    """``done[name]``: the figure ``make()`` draws, saved, or why it was skipped."""
    try:
        fig = make()
    except ReportError as e:
        done[name] = f"skipped: {e}"
        return
    if debug:
        fig.suptitle("includes debug runs (debug=fast)", color="C3")
    done[name] = save(fig, out / name)


__all__ = ["density_sweep", "efficiency_bars", "find_overlap", "lr_sweep", "mask_bars", "mask_heatmap",
           "module_density", "overlap_from_records", "overlap_heatmap", "parse_module", "save", "write_figures"]
