"""Task interface: splits of examples, how to tokenise them, and how to score predictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from speft.config import check_positive, min_set


@dataclass
class TaskConfig:
    name: str = "???"  # the option's name, the same as its YAML file
    max_train_examples: Optional[int] = None  # take the first N training examples (after the seeded split)
    max_eval_examples: Optional[int] = None  # take the first N examples of each evaluation split

    def __post_init__(self) -> None:
        check_positive(self, "task", "max_train_examples", "max_eval_examples")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


class ClassificationTask:
    """Single-text or text-pair classification."""

    head = "seq_cls"  # model head, see speft.models.loading.auto_class
    text_fields: tuple[str, ...] = ("text",)
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation", "test")
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

    def splits(self, max_train: int | None = None, max_eval: int | None = None) -> dict[str, list[dict]]:
        out = self.load_splits()
        for name, rows in out.items():
            if name == "train":
                cap = min_set(self.cfg.max_train_examples, max_train)
            else:
                cap = min_set(self.cfg.max_eval_examples, max_eval)
            if cap is not None:
                out[name] = rows[:cap]
        return out

    def encode(self, tokenizer, rows: list[dict], max_length: int) -> list[dict]:
        texts = [[r[f] for r in rows] for f in self.text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": rows[i]["label"]} for i in range(len(rows))]

    def compute_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        preds = logits.argmax(-1)
        return {"accuracy": (preds == labels).double().mean().item()}

