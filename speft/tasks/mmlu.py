"""``task=mmlu``: instruction-tune on Alpaca or OASST2, evaluate 5-shot MMLU by log-likelihood.

Training data (``task.train_data``):

* ``alpaca``: ``instruction``/``input``/``output`` records; local ``<data_dir>/alpaca/alpaca_data.json``
  (Stanford Alpaca's file) or ``task.train_file``; offline without it, the 2,000-record
  ``<data_dir>/alpaca_subset/alpaca_data_2000_subset.json`` (a warning says so); else the Hub
  (``tatsu-lab/alpaca``);
* ``oasst2``: OpenAssistant OASST2 message rows (``message_id``, ``parent_id``, ``role``, ``text``,
  ``rank``, ``lang``): each root prompt with its best-ranked assistant reply; local
  ``<data_dir>/oasst2/train.jsonl`` (the Hub rows as JSON lines) or the Hub (``OpenAssistant/oasst2``).

Evaluation: MMLU test (57 subjects, or ``task.subjects``), 5-shot from dev (the first five of each
subject), scored by the log-likelihood of " A".." D" with the harness's tokenisation (the tokenizer's
own BOS, once; :mod:`speft.evaluation.mmlu`); ``accuracy`` is the average over questions,
``accuracy_macro`` over subjects, plus one ``subject/<name>`` entry per subject.
Local layout ``<data_dir>/mmlu/data/{dev,test}/<subject>_{dev,test}.csv``, else the Hub (``cais/mmlu``).
A cap on evaluation examples (``max_eval_examples``) takes the same number from each subject.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from speft.config import check
from speft.registry import register
from speft.tasks.base import DataError
from speft.tasks.lm import CausalLMTask, LMTaskConfig, check_train_data, read_csv_rows, read_json_list, read_jsonl

log = logging.getLogger(__name__)

HUB_MMLU = "cais/mmlu"
HUB_ALPACA = "tatsu-lab/alpaca"
HUB_OASST2 = "OpenAssistant/oasst2"
TRAIN_DATA = ("alpaca", "oasst2")
LETTERS = "ABCD"


@dataclass
class MmluConfig(LMTaskConfig):
    name: str = "mmlu"
    train_data: str = "alpaca"  # alpaca | oasst2
    template: str = "alpaca"  # Alpaca's own prompt format
    hub_revision: Optional[str] = None  # a Hub commit of the training dataset, for reproducibility online
    subjects: Optional[list[str]] = None  # MMLU subjects to evaluate; null = all 57
    oasst2_lang: Optional[str] = "en"  # OASST2 conversations in this language; null = all

    def __post_init__(self) -> None:
        super().__post_init__()
        check_train_data(self.name, self.train_data, TRAIN_DATA)
        check(self.subjects is None or len(self.subjects) > 0, "task.subjects must be null (all) or a list")


@register("task", "mmlu", schema=MmluConfig)
class Mmlu(CausalLMTask):
    main_metric = "accuracy"

    def mmlu_split(self, split: str) -> list[dict]:
        folder = self.local("mmlu", "data", split)
        if folder is not None:
            rows = []
            for path in sorted(folder.glob(f"*_{split}.csv")):
                subject = path.name[: -len(f"_{split}.csv")]
                for n, r in enumerate(read_csv_rows(path, 6), 1):
                    if r[5].strip() not in LETTERS:
                        raise DataError(f"{path}:{n}: answer {r[5]!r} is not one of A, B, C, D")
                    rows.append({"subject": subject, "question": r[0], "choices": r[1:5],
                                 "answer": LETTERS.index(r[5].strip())})
            if not rows:
                raise DataError(f"{folder}: no *_{split}.csv files (MMLU layout data/{split}/<subject>_{split}.csv)")
        else:
            rows = [{"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                     "answer": int(r["answer"])} for r in self.hub(HUB_MMLU, "all", split, training=False)]
        if self.cfg.subjects:
            known = sorted({r["subject"] for r in rows})
            unknown = sorted(set(self.cfg.subjects) - set(known))
            check(not unknown, f"task.subjects: unknown MMLU subject(s) {', '.join(unknown)}. "
                  f"Valid choices: {', '.join(known)}")
            rows = [r for r in rows if r["subject"] in set(self.cfg.subjects)]
        return rows

    def load_train(self) -> list[dict]:
        if self.cfg.train_data == "alpaca":
            path = self.train_path("alpaca", "alpaca_data.json")
            if path is None and self.cfg.source != "hub" and not self.cfg.train_file:
                path = self.local("alpaca_subset", "alpaca_data_2000_subset.json") if self.data_dir else None
                if path is not None:
                    log.warning("training on %s (2,000 Alpaca-format records of unverified provenance): "
                                "fine for pipeline checks, not for results; set task.train_file", path)
            keys = ("instruction", "input", "output")
            rows = read_json_list(path, keys) if path else self.hub(HUB_ALPACA, None, "train")
            return [{"prompt": r["instruction"], "input": r["input"], "response": r["output"]} for r in rows]
        path = self.train_path("oasst2", "train.jsonl")
        rows = read_jsonl(path, ("message_id", "role", "text")) if path else self.hub(HUB_OASST2, None, "train")
        return oasst2_pairs(rows, self.cfg.oasst2_lang)

    def load_splits(self) -> dict[str, list[dict]]:
        self.dev = self.mmlu_split("dev")
        return {"train": self.load_train(), "test": self.mmlu_split("test")}

    def cap_test(self, rows: list[dict], cap: int | None) -> list[dict]:
        """The first ``ceil(cap / subjects)`` questions of every subject, ``cap`` in all."""
        if cap is None or cap >= len(rows):
            return rows
        subjects = list(dict.fromkeys(r["subject"] for r in rows))
        per, taken, out = math.ceil(cap / len(subjects)), dict.fromkeys(subjects, 0), []
        for r in rows:
            if taken[r["subject"]] < per and len(out) < cap:
                taken[r["subject"]] += 1
                out.append(r)
        return out

    def evaluate(self, split, model, tokenizer, rows, *, device, out_dir: Path, max_new_tokens=None):
        from speft.evaluation import mmlu

        out = mmlu.evaluate(model, tokenizer, rows, self.dev, num_fewshot=self.cfg.num_fewshot, device=device,
                            batch_size=self.cfg.eval_batch_size, max_context=self.cfg.max_context,
                            predictions_path=Path(out_dir) / f"predictions_{split}.jsonl")
        metrics = {"accuracy": out["accuracy"], "accuracy_macro": out["accuracy_macro"],
                   **{f"subject/{s}": v for s, v in sorted(out["subjects"].items())}}
        return metrics, {"examples": out["num_examples"], "questions_per_s": out["questions_per_s"]}


def oasst2_pairs(rows: list[dict], lang: str | None) -> list[dict]:
    """Each root prompt (a ``prompter`` message without parent) with its best-ranked assistant reply."""
    replies: dict[str, dict] = {}
    for r in rows:
        if r.get("role") == "assistant" and r.get("parent_id"):
            best = replies.get(r["parent_id"])
            rank = r.get("rank") if r.get("rank") is not None else math.inf
            if best is None or rank < (best.get("rank") if best.get("rank") is not None else math.inf):
                replies[r["parent_id"]] = r
    pairs = [{"prompt": r["text"], "response": replies[r["message_id"]]["text"]} for r in rows
             if r.get("role") == "prompter" and not r.get("parent_id") and r["message_id"] in replies
             and (lang is None or r.get("lang") == lang)]
    if not pairs:
        raise DataError(f"no OASST2 prompt/reply pairs{f' in language {lang}' if lang else ''}")
    return pairs
