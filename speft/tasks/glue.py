"""The GLUE benchmark's eight training tasks: ``task=glue/<name>``.

Data comes from a local copy in the layout of the GLUE download script (``<data_dir>/glue/<DIR>/
{train,dev}.tsv``; MNLI ``dev_matched.tsv`` and ``dev_mismatched.tsv``) or from the Hugging Face Hub
(``nyu-mll/glue``). Our field and split names are the Hub's, and our label ids its ``ClassLabel`` ids,
so one table (:data:`LAYOUTS`) maps the local columns and both sources give identical rows.

GLUE's test labels are hidden: the dev files are our evaluation splits (``validation``; MNLI
``validation_matched`` and ``validation_mismatched``), as in the study and every GLUE paper.

Metrics are the official ones (scikit-learn and scipy, see :mod:`speft.tasks.base`). Tasks with two
metrics also report their mean, ``combined_score`` (the convention of transformers' ``run_glue``),
which is their ``main_metric``: the value that picks the best evaluation.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from omegaconf import MISSING

from speft.config import check, check_choice
from speft.registry import register
from speft.tasks.base import METRICS, ClassificationTask, DataError, TaskConfig

log = logging.getLogger(__name__)

SOURCES = ("auto", "local", "hub")
HUB_ID = "nyu-mll/glue"
DOWNLOAD_HINT = ("the layout of the GLUE download script (https://gluebenchmark.com/tasks; "
                 "see ../shared/data/README.md), under paths.data_dir or $SPEFT_DATA_DIR")


@dataclass
class GlueConfig(TaskConfig):
    name: str = MISSING  # glue/<task>, the same as the YAML file
    source: str = "auto"  # auto: local files when <data_dir>/glue/<DIR> exists, else the Hub; or local / hub
    hub_dataset: str = HUB_ID  # the Hub dataset with one configuration per GLUE task
    hub_revision: Optional[str] = None  # a Hub commit, for reproducibility when online
    skip_malformed: bool = False  # false: a malformed local row stops the run; true: drop it with a warning

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("task.source", self.source, SOURCES)
        check(bool(self.hub_dataset), "task.hub_dataset must name a Hub dataset, e.g. nyu-mll/glue")


@dataclass(frozen=True)
class Layout:
    """Where a GLUE task's data lives and how its rows read."""

    dir: str  # folder under <data_dir>/glue, as the GLUE download script names it
    hub_config: str  # configuration of nyu-mll/glue
    # our field (= the Hub's feature) -> local column: a header name, or a position in a header-less file
    fields: dict[str, Union[str, int]]
    labels: tuple[str, ...]  # label names in the Hub's ClassLabel order (our ids); () = regression
    raw_labels: tuple[str, ...]  # the local files' label strings, in the same order
    metrics: tuple[str, ...]  # official GLUE metrics, names of speft.tasks.base.METRICS
    # our split (= the Hub's split) -> local file
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"})
    width: Optional[int] = None  # columns of a header-less file (CoLA)

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.fields if f != "label")


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
LAYOUTS: dict[str, Layout] = {
    "cola": Layout("CoLA", "cola", {"sentence": 3, "label": 1}, ("unacceptable", "acceptable"), BINARY,
                   ("matthews_correlation",), width=4),
    "sst2": Layout("SST-2", "sst2", {"sentence": "sentence", "label": "label"}, ("negative", "positive"), BINARY,
                   ("accuracy",)),
    "mrpc": Layout("MRPC", "mrpc", {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
                   ("not_equivalent", "equivalent"), BINARY, ("f1", "accuracy")),
    "stsb": Layout("STS-B", "stsb", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
                   (), (), ("pearson", "spearman")),
    "qqp": Layout("QQP", "qqp", {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
                  ("not_duplicate", "duplicate"), BINARY, ("f1", "accuracy")),
    "mnli": Layout("MNLI", "mnli", {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                   ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
                   ("accuracy",), files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                                         "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": Layout("QNLI", "qnli", {"question": "question", "sentence": "sentence", "label": "label"}, NLI2, NLI2,
                   ("accuracy",)),
    "rte": Layout("RTE", "rte", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, NLI2, NLI2,
                  ("accuracy",)),
}
STSB_RANGE = (0.0, 5.0)  # STS-B similarity scores


class _RowError(ValueError):
    pass


def _parse_row(row: list[str], positions: dict[str, int], layout: Layout) -> dict:
    out: dict[str, Any] = {}
    for name in layout.text_fields:
        text = row[positions[name]]
        if not text.strip():
            raise _RowError(f"empty {name} (column {layout.fields[name]!r})")
        out[name] = text
    raw = row[positions["label"]].strip()
    if not layout.labels:
        try:
            value = float(raw)
        except ValueError:
            raise _RowError(f"score {raw!r} is not a number") from None
        lo, hi = STSB_RANGE
        if not lo <= value <= hi:  # also rejects nan
            raise _RowError(f"score {raw!r} is outside [{lo:g}, {hi:g}]")
        out["label"] = value
    elif raw in layout.raw_labels:
        out["label"] = layout.raw_labels.index(raw)
    else:
        raise _RowError(f"unknown label {raw!r}; expected one of {', '.join(layout.raw_labels)}")
    return out


def read_tsv(path: Path, layout: Layout, skip_malformed: bool = False) -> list[dict]:
    """Rows of one GLUE TSV file; a malformed row raises DataError naming the file and line.

    Tab-separated with no quote processing (QNLI, RTE and MRPC hold stray ``"``); ``utf-8-sig`` drops
    MRPC's byte-order mark. Columns are found by header name (CoLA: by position, it has no header).
    """
    path = Path(path)
    rows, skipped = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            if layout.width is None:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file; expected a header with columns "
                                    f"{', '.join(map(str, layout.fields.values()))}")
                missing = [c for c in layout.fields.values() if c not in header]
                if missing:
                    raise DataError(f"{path}, line 1: the header lacks column(s) {', '.join(map(repr, missing))}; "
                                    f"found {header}")
                positions = {k: header.index(c) for k, c in layout.fields.items()}
                width = len(header)
            else:
                positions, width = dict(layout.fields), layout.width  # type: ignore[arg-type]
            for row in reader:
                if not row:  # a blank line
                    continue
                try:
                    if len(row) != width:
                        raise _RowError(f"expected {width} tab-separated columns, found {len(row)}")
                    rows.append(_parse_row(row, positions, layout))
                except _RowError as e:
                    if not skip_malformed:
                        raise DataError(f"{path}, line {reader.line_num}: {e} (set task.skip_malformed=true "
                                        f"to drop malformed rows)") from None
                    skipped.append(f"line {reader.line_num}: {e}")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, after line {reader.line_num}: not UTF-8 text ({e})") from None
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (task.skip_malformed=true): %s%s", path, len(skipped),
                    "; ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    return rows


class GlueTask(ClassificationTask):
    """One GLUE task; a subclass names its :class:`Layout` (``short``) and its main metric."""

    short = ""  # the key of LAYOUTS, e.g. "mrpc"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        layout = LAYOUTS[cls.short]
        cls.layout = layout
        cls.text_fields = layout.text_fields
        cls.label_names = layout.labels
        cls.eval_splits = tuple(s for s in layout.files if s != "train")
        cls.validation_split = cls.eval_splits[0]
        cls.main_metric = layout.metrics[0] if len(layout.metrics) == 1 else "combined_score"

    def __init__(self, cfg: GlueConfig, data_dir: Any = None) -> None:
        super().__init__(cfg, data_dir)
        # normpath: error messages name /work/shared/data/..., not /work/main/../shared/data/...
        self.data_dir = Path(os.path.normpath(Path(data_dir).expanduser())) if data_dir is not None else None

    @property
    def regression(self) -> bool:
        return not self.layout.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)

    @property
    def local_dir(self) -> Optional[Path]:
        return self.data_dir / "glue" / self.layout.dir if self.data_dir is not None else None

    def load_splits(self) -> dict[str, list[dict]]:
        source = self.cfg.source
        if source == "auto":
            source = "local" if self.local_dir is not None and self.local_dir.is_dir() else "hub"
        splits = self.load_local() if source == "local" else self.load_hub()
        log.info("%s (%s): %s", self.cfg.name, source, {k: len(v) for k, v in splits.items()})
        return splits

    def load_local(self) -> dict[str, list[dict]]:
        if self.local_dir is None:
            raise DataError(f"{self.cfg.name}: task.source=local needs paths.data_dir (or $SPEFT_DATA_DIR)")
        out = {}
        for split, file in self.layout.files.items():
            path = self.local_dir / file
            if not path.is_file():
                raise DataError(f"{self.cfg.name}: the {split} split is missing: expected {path} ({DOWNLOAD_HINT}); "
                                f"online, task.source=hub loads {self.cfg.hub_dataset} ({self.layout.hub_config})")
            out[split] = read_tsv(path, self.layout, self.cfg.skip_malformed)
        return out

    def load_hub(self) -> dict[str, list[dict]]:
        cfg, layout = self.cfg, self.layout
        try:
            from datasets import load_dataset

            ds = load_dataset(cfg.hub_dataset, layout.hub_config, revision=cfg.hub_revision)
            keep = [*layout.text_fields, "label"]
            raw = {split: list(ds[split].select_columns(keep)) for split in layout.files}
        except Exception as e:  # noqa: BLE001 - offline, missing package, unknown revision: one clear message
            local = self.local_dir or "<paths.data_dir>/glue/" + layout.dir
            files = " and ".join(layout.files.values())
            raise DataError(f"{cfg.name}: no local copy at {local} (from paths.data_dir={self.data_dir}) and the "
                            f"Hub dataset {cfg.hub_dataset} (configuration {layout.hub_config!r}) could not be "
                            f"loaded ({type(e).__name__}: {e}). Offline, put {files} at {local} in the layout of "
                            f"the GLUE download script, or point paths.data_dir at the folder that holds "
                            f"glue/{layout.dir}") from e
        out = {}
        for split, examples in raw.items():
            rows = []
            for i, ex in enumerate(examples):
                label = float(ex["label"]) if self.regression else int(ex["label"])
                if not self.regression and not 0 <= label < self.num_labels:  # -1: a hidden test label
                    raise DataError(f"{cfg.hub_dataset} ({layout.hub_config}), {split} row {i}: label {label}")
                rows.append({**{f: ex[f] for f in layout.text_fields}, "label": label})
            out[split] = rows
        return out

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """The class id, or for a regression task (STS-B) the one output as the score."""
        return logits.reshape(len(logits), -1)[:, 0] if self.regression else super().predictions(logits)

    def compute_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        preds = self.predictions(logits)
        out = {name: METRICS[name](preds, labels) for name in self.layout.metrics}
        if len(out) > 1:
            out["combined_score"] = float(np.mean(list(out.values())))
        return out


@register("task", "glue/cola", schema=GlueConfig)
class CoLA(GlueTask):
    """Corpus of Linguistic Acceptability: is the sentence grammatical? Matthews correlation."""

    short = "cola"


@register("task", "glue/sst2", schema=GlueConfig)
class SST2(GlueTask):
    """Stanford Sentiment Treebank, binary sentence sentiment. Accuracy."""

    short = "sst2"


@register("task", "glue/mrpc", schema=GlueConfig)
class MRPC(GlueTask):
    """Microsoft Research Paraphrase Corpus: are the two sentences paraphrases? F1 and accuracy."""

    short = "mrpc"


@register("task", "glue/stsb", schema=GlueConfig)
class STSB(GlueTask):
    """Semantic Textual Similarity Benchmark: a 0-5 similarity score (regression, MSE loss). Pearson, Spearman."""

    short = "stsb"


@register("task", "glue/qqp", schema=GlueConfig)
class QQP(GlueTask):
    """Quora Question Pairs: are the two questions duplicates? F1 and accuracy."""

    short = "qqp"


@register("task", "glue/mnli", schema=GlueConfig)
class MNLI(GlueTask):
    """MultiNLI: entailment, neutral or contradiction. Accuracy on the matched and mismatched dev sets."""

    short = "mnli"


@register("task", "glue/qnli", schema=GlueConfig)
class QNLI(GlueTask):
    """Question NLI (from SQuAD): does the sentence answer the question? Accuracy."""

    short = "qnli"


@register("task", "glue/rte", schema=GlueConfig)
class RTE(GlueTask):
    """Recognizing Textual Entailment. Accuracy."""

    short = "rte"
