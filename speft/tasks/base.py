"""Task interface: splits of examples, how to tokenise them, and how to score predictions."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import MISSING

from speft.config import check_positive


@dataclass
class TaskConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    max_train_examples: Optional[int] = None  # take N training examples: the first N, or a seeded N (subset_seed)
    max_eval_examples: Optional[int] = None  # take the first N examples of each evaluation split
    # A cap on train takes the first N rows in file order; with a seed, the first N of a seeded
    # shuffle: a fixed random subset, the same for every run seed (and nested as N grows).
    subset_seed: Optional[int] = None
    # Tuning without the reported split: hold out N training examples (the last N of the subset_seed
    # shuffle, seed 0 when null; disjoint from every capped training subset of that shuffle) as the
    # one evaluation split, `heldout`; the task's own evaluation splits (GLUE's dev set) are not read.
    heldout_examples: Optional[int] = None
    max_length: int = 128  # tokens per example after truncation (short texts; GLUE presets: 196, LM tasks: 512)
    eval_batch_size: int = 256  # examples per evaluation batch: no activations kept, so larger than training

    def __post_init__(self) -> None:
        check_positive(self, "task", "max_train_examples", "max_eval_examples", "max_length", "eval_batch_size",
                       "heldout_examples")


HELDOUT = "heldout"  # the evaluation split held out of the training data (task.heldout_examples)


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


class ClassificationTask:
    """Single-text or text-pair classification."""

    head = "seq_cls"  # model head, see speft.models.loading.auto_class
    new_head = True  # the head is created for the task (trained unless method.train_head=false)
    generative = False  # True: evaluated by the task's own evaluate(), not by logits over labels
    text_fields: tuple[str, ...] = ("text",)
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation", "test")
    validation_split = "validation"  # evaluated during training; its main_metric picks the best evaluation
    main_metric = "accuracy"

    def __init__(self, cfg: TaskConfig, data_dir: Any = None) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        if cfg.heldout_examples:  # the held-out training examples replace the evaluation splits
            self.eval_splits = (HELDOUT,)
            self.validation_split = HELDOUT

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def load_splits(self) -> dict[str, list[dict]]:
        """Every split as a list of ``{<text fields>..., "label": int}``."""
        raise NotImplementedError

    def splits(self) -> dict[str, list[dict]]:
        """The splits, capped by ``max_train_examples`` and ``max_eval_examples``; with ``heldout_examples``,
        the training split and the examples held out of it (``heldout``) only."""
        out = self.load_splits()
        if self.cfg.heldout_examples:
            out = dict(zip(("train", HELDOUT), self.hold_out(out["train"])))
        for name, rows in out.items():
            if name == "train":
                out[name] = self.train_subset(rows)
            elif self.cfg.max_eval_examples is not None:
                out[name] = rows[: self.cfg.max_eval_examples]
        return out

    def shuffled(self, n: int) -> list[int]:
        """Row positions in the order of the ``subset_seed`` shuffle (seed 0 when null)."""
        order = list(range(n))
        random.Random(self.cfg.subset_seed or 0).shuffle(order)
        return order

    def hold_out(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """(the rest, the held-out rows): the last ``heldout_examples`` of the shuffle. A seeded cap takes the
        first N of the same shuffle, so the training subset is the one a run without held-out examples gets."""
        n, cap = self.cfg.heldout_examples, self.cfg.max_train_examples or 0
        if n + max(cap, 1) > len(rows):
            raise DataError(f"task.heldout_examples={n} plus task.max_train_examples={cap or 'all'} exceed the "
                            f"{len(rows)} training examples of task={self.cfg.name}; hold out at most "
                            f"{len(rows) - max(cap, 1)}")
        order = self.shuffled(len(rows))
        keep, held = order[: len(rows) - n], sorted(order[len(rows) - n:])
        if self.cfg.subset_seed is None:  # an unseeded cap takes the first N rows in file order
            keep = sorted(keep)
        return [rows[i] for i in keep], [rows[i] for i in held]

    def train_subset(self, rows: list[dict]) -> list[dict]:
        """The capped training split: the first N rows, or the first N of a ``subset_seed`` shuffle."""
        cap = self.cfg.max_train_examples
        if cap is None or cap >= len(rows):
            return rows
        if self.cfg.subset_seed is not None:
            if self.cfg.heldout_examples:  # hold_out already put the rows in the shuffle's order
                return rows[:cap]
            return [rows[i] for i in self.shuffled(len(rows))[:cap]]
        return rows[:cap]

    def encode(self, tokenizer, rows: list[dict], max_length: int | None = None) -> list[dict]:
        """Tokenise, truncating to ``max_length`` (default ``task.max_length``)."""
        max_length = max_length or self.cfg.max_length
        texts = [[r[f] for r in rows] for f in self.text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": rows[i]["label"]} for i in range(len(rows))]

    def collator(self, tokenizer):
        """Batches of encoded examples, padded to the longest."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """One prediction per example: the class id with the largest logit."""
        return logits.argmax(-1)

    def compute_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": accuracy(self.predictions(logits), labels)}

    def prediction_records(self, logits: torch.Tensor, labels: torch.Tensor, index: list[int]) -> list[dict]:
        """The predictions file's rows, in the split's file order: ``index`` gives each logit row's position in
        the split (the evaluation batches run sorted by length). Two runs' files pair example by example."""
        rows = [{"index": i, "label": y, "prediction": p}
                for i, y, p in zip(index, labels.tolist(), self.predictions(logits).tolist(), strict=True)]
        return sorted(rows, key=lambda r: r["index"])


# ----------------------------------------------------------------------------------------------
# Metrics with their official definitions (GLUE: scikit-learn and scipy, as the reference scripts).
# Inputs: 1-D tensors or arrays of predictions and gold labels (class ids, or scores for regression).


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(preds: Any, labels: Any) -> float:
    preds, labels = _np(preds), _np(labels)
    return float((preds == labels).mean())


def f1(preds: Any, labels: Any) -> float:
    """F1 of the positive class (label 1), as GLUE's MRPC and QQP; 0.0 when it is never predicted nor gold."""
    from sklearn.metrics import f1_score

    return float(f1_score(_np(labels), _np(preds), pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(preds: Any, labels: Any) -> float:
    """Matthews correlation (CoLA); scikit-learn returns 0.0 when predictions or labels are constant."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(_np(labels), _np(preds)))


def _correlation(fn, preds: Any, labels: Any) -> float:
    """scipy's coefficient; NaN when it is undefined (a constant input, or fewer than two examples)."""
    preds, labels = _np(preds).astype(np.float64).reshape(-1), _np(labels).astype(np.float64).reshape(-1)
    if preds.size < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        return float("nan")
    return float(fn(preds, labels)[0])


def pearson(preds: Any, labels: Any) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds: Any, labels: Any) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
           "pearson": pearson, "spearman": spearman}

