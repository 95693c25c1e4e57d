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
    max_length: int = 128  # tokens per example after truncation (short texts; GLUE presets: 196, LM tasks: 512)
    eval_batch_size: int = 256  # examples per evaluation batch: no activations kept, so larger than training

    def __post_init__(self) -> None:
        check_positive(self, "task", "max_train_examples", "max_eval_examples", "max_length", "eval_batch_size")


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

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def load_splits(self) -> dict[str, list[dict]]:
        """Every split as a list of ``{<text fields>..., "label": int}``."""
        raise NotImplementedError

    def splits(self) -> dict[str, list[dict]]:
        """The splits, capped by ``max_train_examples`` and ``max_eval_examples``."""
        out = self.load_splits()
        for name, rows in out.items():
            if name == "train":
                out[name] = self.train_subset(rows)
            elif self.cfg.max_eval_examples is not None:
                out[name] = rows[: self.cfg.max_eval_examples]
        return out

    def train_subset(self, rows: list[dict]) -> list[dict]:
        """The capped training split: the first N rows, or the first N of a ``subset_seed`` shuffle."""
        cap = self.cfg.max_train_examples
        if cap is None or cap >= len(rows):
            return rows
        if self.cfg.subset_seed is not None:
            order = list(range(len(rows)))
            random.Random(self.cfg.subset_seed).shuffle(order)
            return [rows[i] for i in order[:cap]]
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

    def compute_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": accuracy(logits.argmax(-1), labels)}


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

