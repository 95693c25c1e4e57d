"""Causal-LM tasks: instruction data for training, a benchmark evaluator for the end (GSM8K, MMLU).

Training rows are ``{"prompt", "input", "response"}`` whatever the source; a *template* turns them into
a prompt text and a response text (``qa``: ``Question: …\\nAnswer: …``, the format GSM8K is evaluated
in; ``alpaca``: the Stanford Alpaca prompt, also used by MetaMathQA;
``pissa``: PiSSA's training prompt, which the released code's LLM scripts follow; ``chat``: the
tokenizer's chat template, user turn then assistant turn). The response ends with the
end-of-sequence token so the model learns to stop, and the loss covers the response tokens only
(``train_on_prompt=true`` to include the prompt). Examples are truncated to ``max_length`` tokens; an
example left without response tokens is dropped and counted. ``packing=true`` concatenates the
encoded examples and cuts them into blocks of ``max_length`` (fewer pad tokens; attention then spans
example boundaries, as in common SFT packing).

Evaluation follows lm-evaluation-harness (:mod:`speft.evaluation`): the test split is scored once at
the end of training, and per-example predictions are written beside ``results.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from speft.config import check, check_choice, check_positive
from speft.tasks.base import ClassificationTask, DataError, TaskConfig

log = logging.getLogger(__name__)

SOURCES = ("auto", "local", "hub")
TEMPLATES = ("qa", "alpaca", "pissa", "chat")
IGNORE = -100  # label of tokens without loss

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n")
# PiSSA's training script (GraphPKU/PiSSA train.py, which the released run_math.py and run_code.py follow):
# no newline after "Response:", and the target is "<output>\n" then EOS
PISSA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:")


@dataclass
class LMTaskConfig(TaskConfig):
    source: str = "auto"  # auto: local files when present, else the Hub; or local / hub
    train_file: Optional[str] = None  # a local training file in its dataset's original layout (overrides the default)
    template: str = "qa"  # qa | alpaca | pissa | chat (the tokenizer's chat template)
    qa_prompt: str = "Question: {prompt}\nAnswer:"  # template=qa: the prompt; {prompt} is the question
    train_on_prompt: bool = False  # false: loss on response tokens only
    packing: bool = False  # concatenate examples into blocks of max_length
    num_fewshot: int = 5  # in-context examples at evaluation (lm-evaluation-harness default for both)
    max_length: int = 512  # tokens per training example (prompt + response)
    eval_batch_size: int = 8  # prompts per evaluation batch (5-shot prompts are long)
    max_context: Optional[int] = None  # evaluation prompt tokens kept (from the end); null = the model's limit

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("task.source", self.source, SOURCES)
        check_choice("task.template", self.template, TEMPLATES)
        check_positive(self, "task", "eval_batch_size", "max_context")
        check_positive(self, "task", "num_fewshot", allow_zero=True)
        check("{prompt}" in self.qa_prompt, f"task.qa_prompt={self.qa_prompt!r} must contain {{prompt}}")


class CausalLMTask(ClassificationTask):
    """Base of the causal-LM tasks: the model keeps its pretrained LM head (frozen)."""

    head = "causal_lm"
    new_head = False  # the LM head is pretrained: methods leave it frozen
    generative = True  # evaluated by :meth:`evaluate`, not by logits over a label set
    eval_splits = ("test",)
    validation_split = "test"
    train_sources: dict[str, Any] = {}  # train_data name -> loader method name

    def __init__(self, cfg: TaskConfig, data_dir: Any = None) -> None:
        check(not cfg.heldout_examples, f"task.heldout_examples={cfg.heldout_examples}: held-out training examples "
                                        f"are an evaluation split of classification tasks; task={cfg.name} is "
                                        f"evaluated on its test problems (cap them with task.max_eval_examples)")
        super().__init__(cfg, data_dir)

    @property
    def num_labels(self) -> None:  # type: ignore[override]
        return None

    # -- data -------------------------------------------------------------------------------------

    def local(self, *parts: str) -> Path | None:
        """``<data_dir>/<parts>`` when local data may be used and it exists, else None (Hub)."""
        if self.cfg.source == "hub" or self.data_dir is None:
            return None
        path = Path(self.data_dir, *parts)
        if path.exists():
            return path
        if self.cfg.source == "local":
            raise DataError(f"{path} not found (task.source=local); put the file there in its original layout, "
                            f"set paths.data_dir / $SPEFT_DATA_DIR, or use task.source=auto to download it")
        return None

    def train_path(self, *default: str) -> Path | None:
        if self.cfg.train_file:
            path = Path(os.path.expanduser(self.cfg.train_file))
            if not path.is_file():
                raise DataError(f"task.train_file={self.cfg.train_file} does not exist")
            return path
        return self.local(*default)

    def hub(self, dataset: str, config: str | None, split: str, training: bool = True) -> list[dict]:
        """Rows of a Hub dataset; ``task.hub_revision`` pins the training dataset only (``training``)."""
        if self.cfg.source == "local":
            raise DataError(f"no local copy of {dataset} and task.source=local")
        from datasets import load_dataset

        log.info("loading %s (%s, %s) from the Hugging Face Hub", dataset, config, split)
        try:
            revision = getattr(self.cfg, "hub_revision", None) if training else None
            return list(load_dataset(dataset, config, split=split, revision=revision))
        except Exception as e:  # noqa: BLE001 - offline machines: name what to do instead
            raise DataError(f"could not load {dataset} from the Hub ({type(e).__name__}: {e}); offline, put the "
                            f"files under paths.data_dir (see ../shared/data/README.md) or set "
                            f"task.train_file") from None

    def splits(self) -> dict[str, list[dict]]:
        rows = self.load_splits()
        train = self.train_subset(rows["train"])  # without subset_seed: the first N (the study's slice)
        return {"train": train, "test": self.cap_test(rows["test"], self.cfg.max_eval_examples)}

    def cap_test(self, rows: list[dict], cap: int | None) -> list[dict]:
        return rows if cap is None else rows[:cap]

    # -- training examples ------------------------------------------------------------------------

    def texts(self, row: dict) -> tuple[str, str]:
        """(prompt text, response text) of a training row under a plain template."""
        prompt, extra, response = row["prompt"], row.get("input") or "", row["response"]
        if self.cfg.template == "alpaca":
            fmt = ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT
            return fmt.format(prompt=prompt, input=extra), response
        if self.cfg.template == "pissa":
            return PISSA_PROMPT.format(prompt=f"{prompt}\n\n{extra}" if extra else prompt), response + "\n"
        question = f"{prompt}\n\n{extra}" if extra else prompt
        return self.cfg.qa_prompt.format(prompt=question), " " + response  # the harness's target delimiter

    def token_pairs(self, tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        if self.cfg.template == "chat":
            return [chat_pair(tokenizer, row) for row in rows]
        prompts, responses = zip(*(self.texts(r) for r in rows)) if rows else ((), ())
        p_ids = tokenizer(list(prompts))["input_ids"]
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [(p, r + eos) for p, r in zip(p_ids, r_ids)]

    def encode(self, tokenizer, rows: list[dict], max_length: int | None = None) -> list[dict]:
        max_length = max_length or self.cfg.max_length
        cut = None if self.cfg.packing else max_length  # packed examples are cut into blocks, not truncated
        out, dropped = [], 0
        for p, r in self.token_pairs(tokenizer, rows):
            labels = (p if self.cfg.train_on_prompt else [IGNORE] * len(p)) + r
            ids = (p + r)[:cut]
            labels = labels[:cut]
            if all(label == IGNORE for label in labels):
                dropped += 1  # the prompt alone fills max_length: nothing to learn from
                continue
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if dropped:
            log.warning("%d of %d training examples dropped: no response token within max_length=%d",
                        dropped, len(rows), max_length)
        if not out and rows:
            raise DataError(f"every training example is longer than max_length={max_length} before its response")
        return pack(out, max_length) if self.cfg.packing else out

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, split: str, model, tokenizer, rows: list[dict], *, device, out_dir: Path,
                 max_new_tokens: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, throughput figures) of ``model`` on ``rows``."""
        raise NotImplementedError


def chat_pair(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Prompt and response token ids under the tokenizer's chat template (user turn, assistant turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("task.template=chat but the tokenizer has no chat template; use template=qa or alpaca")
    user = row["prompt"] + (f"\n\n{row['input']}" if row.get("input") else "")
    as_ids = lambda x: list(x["input_ids"] if hasattr(x, "keys") else x)  # noqa: E731 - dict or list by version
    prompt = as_ids(tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                                  add_generation_prompt=True))
    full = as_ids(tokenizer.apply_chat_template([{"role": "user", "content": user},
                                                 {"role": "assistant", "content": row["response"]}], tokenize=True))
    if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns: split at the common prefix
        n = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), len(prompt)))
        prompt = full[:n]
    return prompt, full[len(prompt):]


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate the examples and cut the stream into blocks of ``block`` tokens (the last one shorter)."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [{"input_ids": ids[i : i + block], "attention_mask": [1] * len(ids[i : i + block]),
             "labels": labels[i : i + block]} for i in range(0, len(ids), block)]


# ----------------------------------------------------------------------------------------------
# Readers of the original file layouts; errors name the file and line.


def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON object ({e})") from None
            require(row, keys, f"{path}:{n}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_json_list(path: Path, keys: tuple[str, ...]) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON list of records")
    for n, row in enumerate(rows):
        require(row, keys, f"{path}: record {n}")
    return rows


def require(row: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object" + (f" with keys {', '.join(keys)}" if keys else ""))
    missing = [k for k in keys if not isinstance(row.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing or non-text field(s) {', '.join(missing)}; expected {', '.join(keys)}")


def read_csv_rows(path: Path, columns: int) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != columns:
                raise DataError(f"{path}:{n}: {len(row)} columns, expected {columns}")
            rows.append(row)
    return rows


def check_train_data(name: str, value: str, choices) -> None:
    check(value in choices, f"task.train_data={value!r} is not available for task={name}. "
          f"Valid choices: {', '.join(sorted(choices))}")
