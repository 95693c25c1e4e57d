"""Gather runs into one pandas DataFrame: one row per run, the same columns from results.json or W&B.

Columns (``available_keys`` lists those present):

* every config value under its dotted key: ``task.name``, ``method.name``, ``metric.name``, ``mask.name``,
  ``mask.selection``, ``density`` (the budget as configured, e.g. ``lora:8``), ``seed``, ``model.name``...
* derived: ``budget`` (comparable across methods: ``density`` for salience methods, ``lora:<rank>`` for the
  LoRA family, none for full and head_only), ``trainable_fraction`` (results.json's ``density``: the trainable
  fraction of the target entries), ``trainable_params``, ``total_params``, ``main_metric`` (the task's main
  validation key that results.json records, e.g. ``validation/accuracy``), ``validation_split``, ``train_steps``,
  ``salience`` (results.json's ``salience``: False for methods without a salience mask);
* ``status`` (completed, failed, running, interrupted: counted as not finished, like running),
  ``error`` (type: message), ``run`` (the run folder or W&B id);
* ``timings.<name>`` (seconds), ``peak_memory_mb.<name>``, ``scoring.path``, ``scoring.cache``;
* objects: ``metrics`` and ``best_metrics`` (dicts), ``mask_modules`` and ``mask_final_modules``
  (results.json's ``mask`` and ``mask_final``: module -> selected and total entries).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from speft.results import RESULTS_FILE

WANDB_PREFIX = "wandb:"
OBJECT_COLUMNS = ("metrics", "best_metrics", "mask_modules", "mask_final_modules")
CORE_COLUMNS = ("task.name", "method.name", "metric.name", "mask.name", "mask.selection", "density", "seed",
                "model.name", "scoring.path", "salience")
# W&B run states -> results.json statuses
WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed",
                "running": "running", "pending": "running", "preempted": "interrupted"}


class ReportError(ValueError):
    """Bad input to the report (no results, unknown key...): the message says what to do."""


def uses_salience(value: Any) -> bool:
    """A record's ``salience`` cell: False only when the run is known to use no salience mask (its
    metric and mask keys are unused); unknown counts as True (nothing is hidden)."""
    return value is not False


# ----------------------------------------------------------------------------------------------
# One result -> one flat record


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def budget_of(config: dict, salience: bool | None) -> str | None:
    """A budget label comparable across methods: the sparse ``density`` and LoRA's rank both read ``lora:8``;
    None for methods whose budget is the method itself (full, head_only)."""
    method = config.get("method") or {}
    if uses_salience(salience):
        return None if config.get("density") is None else str(config["density"])
    if method.get("rank") is not None:
        return f"lora:{method['rank']}"
    return None


def error_text(error: Any) -> str | None:
    if not error:
        return None
    if isinstance(error, dict):
        kind, message = error.get("type"), str(error.get("message", "")).strip()
        return f"{kind}: {message}" if kind else message
    return str(error)


def record_from_result(data: dict, run: str) -> dict[str, Any]:
    """The flat record of one results.json (or W&B run mapped to its shape)."""
    config = data.get("config") or {}
    main_key = data.get("main_metric")  # recorded by every run, e.g. validation/accuracy
    salience = data.get("salience")  # False: the method uses no salience mask (LoRA, full...)
    if salience is None and data.get("num_score_examples") is not None:  # results written before "salience"
        salience = bool(data["num_score_examples"])
    rec: dict[str, Any] = flatten(config)
    rec.update({
        "run": run,
        "status": data.get("status") or "unknown",
        "error": error_text(data.get("error")),
        "salience": salience,
        "budget": budget_of(config, salience),
        "trainable_fraction": data.get("density"),
        "trainable_params": data.get("trainable_params"),
        "total_params": data.get("total_params"),
        "main_metric": main_key,
        "validation_split": main_key.split("/")[0] if main_key else "validation",
        "train_steps": data.get("train_steps"),
        "metrics": dict(data.get("metrics") or {}),
        "best_metrics": dict(data.get("best_metrics") or {}),
        "mask_modules": dict(data.get("mask") or {}),
        "mask_final_modules": dict(data.get("mask_final") or {}),
    })
    for group in ("timings", "peak_memory_mb"):
        for k, v in (data.get(group) or {}).items():
            rec[f"{group}.{k}"] = v
    scoring = data.get("scoring") or {}
    rec["scoring.path"] = scoring.get("path")
    rec["scoring.cache"] = scoring.get("cache")
    return rec


# ----------------------------------------------------------------------------------------------
# Sources: folders of results.json files, or W&B projects


def result_files(source: Path) -> list[Path]:
    source = Path(source)
    if not source.exists():
        raise ReportError(f"{source}: no such file or folder")
    if source.is_file():
        return [source]
    return sorted(source.rglob(RESULTS_FILE), key=lambda p: natural_key(str(p)))


def local_records(source: Path) -> list[dict]:
    files = result_files(source)
    if not files:
        raise ReportError(f"{source}: no {RESULTS_FILE} under this folder (give a run folder, a sweep folder "
                          f"(hydra.sweep.dir) or a folder holding several)")
    records = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # a run being written is replaced atomically: this is real damage
            raise ReportError(f"{path}: not a readable results.json ({e})") from None
        if not isinstance(data, dict) or "config" not in data:
            raise ReportError(f"{path}: not a speft results.json (no 'config')")
        records.append(record_from_result(data, str(path.parent)))
    return records


def unflatten(d: dict) -> dict:
    """W&B may return a nested config with dotted keys ("task.name"); nest them."""
    out: dict = {}
    for k, v in d.items():
        if str(k).startswith("_"):  # W&B's own entries (_wandb)
            continue
        parts = str(k).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = unflatten(v) if isinstance(v, dict) else v
    return out


def wandb_result(run) -> dict:
    """A W&B run (``wandb.Api().runs``) in results.json's shape, from its config and summary (what
    ``speft.loggers.wandb`` logs: the final metrics, ``status``, ``density``, ``trainable_params``,
    ``timings/<name>``; ``best/<key>`` and ``main_metric`` when logged)."""
    summary = getattr(run.summary, "_json_dict", None)
    summary = dict(summary if summary is not None else run.summary)
    state = getattr(run, "state", None)
    status = summary.get("status") or WANDB_STATES.get(state, state or "unknown")
    error = summary.get("error") or (f"W&B run state '{state}'" if status == "failed" else None)
    skip = ("timings/", "best/", "train/", "_")
    return {
        "status": status,
        "error": error,
        "config": unflatten(dict(run.config)),
        "metrics": {k: v for k, v in summary.items() if "/" in k and not k.startswith(skip)
                    and isinstance(v, (int, float))},
        "best_metrics": {k[len("best/"):]: v for k, v in summary.items() if k.startswith("best/")},
        "density": summary.get("density"),
        "trainable_params": summary.get("trainable_params"),
        "timings": {k[len("timings/"):]: v for k, v in summary.items() if k.startswith("timings/")},
        "main_metric": summary.get("main_metric"),
        "num_score_examples": summary.get("num_score_examples"),
    }


def wandb_records(path: str, api=None) -> list[dict]:
    """Records of every run of a W&B project ``entity/project`` (``api``: a ``wandb.Api``, for tests)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = list(api.runs(path))
    if not runs:
        raise ReportError(f"wandb:{path}: the project has no runs")
    return [record_from_result(wandb_result(r), f"wandb:{path}/{getattr(r, 'id', i)}") for i, r in enumerate(runs)]


def load_records(sources: Iterable[str | Path], api=None) -> pd.DataFrame:
    """One DataFrame row per run found under ``sources`` (folders searched recursively for results.json,
    results.json files, or ``wandb:<entity>/<project>``)."""
    records: list[dict] = []
    for source in sources:
        s = str(source)
        if s.startswith(WANDB_PREFIX):
            records += wandb_records(s[len(WANDB_PREFIX):], api=api)
        else:
            records += local_records(Path(s))
    if not records:
        raise ReportError("no runs given")
    df = pd.DataFrame.from_records(records)
    for col in CORE_COLUMNS:  # always there (None when a source lacks them: e.g. a W&B run of another project)
        if col not in df:
            df[col] = None
    for col in OBJECT_COLUMNS:  # missing object cells become {} rather than NaN
        df[col] = [v if isinstance(v, dict) else {} for v in df[col]]
    return df


# ----------------------------------------------------------------------------------------------
# Keys and filters


def available_keys(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c not in OBJECT_COLUMNS)


def check_keys(df: pd.DataFrame, keys: Iterable[str], option: str) -> None:
    known = available_keys(df)
    for key in keys:
        if key not in df.columns or key in OBJECT_COLUMNS:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ReportError(f"{option}: unknown key '{key}'.{hint} Available: {', '.join(known)}")


def normalise(v: Any) -> Any:
    """Comparable form of a config value or a command-line string: numbers as floats, booleans and
    none as lower-case words, the rest as strings."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        return s.lower() if s.lower() in ("true", "false", "none", "null") else s


def parse_filter(raw: str) -> tuple[str, bool, set]:
    """``key=value[,value...]`` or ``key!=value[,value...]`` -> (key, negated, accepted values)."""
    m = re.match(r"^([^=!]+)(!?=)(.*)$", raw)
    if not m:
        raise ReportError(f"--filter {raw!r}: write key=value (or key!=value; values may be a comma list)")
    key, op, values = m.group(1).strip(), m.group(2), m.group(3)
    accepted = {normalise(v) for v in values.split(",")}
    accepted = {"none" if v == "null" else v for v in accepted}
    return key, op == "!=", accepted


SALIENCE_GROUPS = ("metric.", "mask.")  # config groups that only matter to methods with a salience mask


def is_debug(df: pd.DataFrame) -> pd.Series:
    """Which runs are debug runs (``debug=fast`` records ``debug_run: true``)."""
    return df["debug_run"].map(lambda v: v is True) if "debug_run" in df else pd.Series(False, index=df.index)


def without_debug(df: pd.DataFrame, include_debug: bool = False) -> tuple[pd.DataFrame, int]:
    """The runs a report shows: debug runs left out unless ``include_debug``; and how many were left out."""
    debug = is_debug(df)
    return (df, 0) if include_debug else (df[~debug], int(debug.sum()))


def apply_filters(df: pd.DataFrame, filters: Iterable[str]) -> pd.DataFrame:
    """The runs matching every filter (``key=value``, ``key!=value``, values a comma list). Filters on
    ``metric.*`` and ``mask.*`` keys leave the runs of methods without a salience mask (LoRA, full...) in:
    their metric and mask settings are unused defaults (``method.name=sparse`` drops them)."""
    for raw in filters:
        key, negated, accepted = parse_filter(raw)
        check_keys(df, [key], "--filter")
        keep = df[key].map(lambda v, accepted=accepted: normalise(v) in accepted)
        keep = ~keep if negated else keep
        if key.startswith(SALIENCE_GROUPS):
            keep |= ~df["salience"].map(uses_salience)
        df = df[keep]
    return df


def natural_key(s: Any) -> tuple:
    """Sort key that orders ``lora:8`` before ``lora:32`` and ``run/9`` before ``run/10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(s)) if t)
