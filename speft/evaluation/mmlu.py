"""MMLU as lm-evaluation-harness 0.4.13's ``mmlu`` task (the ``default`` variant): 5-shot from dev, each
answer letter scored by its log-likelihood after ``Answer:``.

What is equal to the harness (``HFLM`` with its defaults, no chat template), checked against lm-eval 0.4.13
itself in ``tests/test_eval_lm_eval_reference.py``: the prompt string of every question, the token ids of
each (context, continuation) request (the tokenizer's BOS added once, at the start of the context), the
four choice log-likelihoods (within 1e-4: batching and padding differ) and the per-question prediction.

Followed from EleutherAI/lm-evaluation-harness:

- ``lm_eval/tasks/mmlu/default/_default_template_yaml``: ``fewshot_split: dev`` with
  ``sampler: first_n``, ``output_type: multiple_choice``,
  ``doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}``
  ``\\nD. {{choices[3]}}\\nAnswer:"`` (one string),
  ``doc_to_choice: ["A", "B", "C", "D"]``, ``doc_to_target: answer``, metric ``acc``.
- ``lm_eval/tasks/mmlu/_generate_configs.py`` (and e.g. ``default/mmlu_abstract_algebra.yaml``):
  ``description: "The following are multiple choice questions (with answers) about``
  ``{' '.join(subject.split('_'))}.\\n\\n"`` (one string).
- ``lm_eval/api/task.py`` (``fewshot_context``, ``construct_requests``): prompt = description + exemplars
  (``doc_to_text + " " + choice + "\\n\\n"``) + the question's ``doc_to_text``; one request
  ``(prompt, " " + choice)`` per choice (``target_delimiter`` is ``" "``); ``acc`` is
  ``argmax(loglikelihoods) == answer`` (the first maximum wins ties).
- ``lm_eval/models/huggingface.py``: tokenisation (``_encode_pair``) and left truncation to the model's
  ``max_length``, see :mod:`speft.evaluation.generation`. When every continuation is one token the
  harness computes one forward per context (its single-token-continuation logits cache); so does the
  fast path here.
- The ``mmlu`` group aggregates subjects weighted by size (``weight_by_size: true``): ``accuracy`` is the
  micro average over questions; ``accuracy_macro`` (mean over subjects) is reported as well.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from speft.evaluation.generation import (
    encode_pair,
    evaluating,
    max_positions,
    model_device,
    pad_token_id,
    pair_row,
    score_positions,
)
from speft.utils import write_jsonl

log = logging.getLogger(__name__)

CHOICES = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def format_subject(subject: str) -> str:
    """``"abstract_algebra"`` -> ``"abstract algebra"``."""
    return " ".join(subject.split("_"))


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_question(row: dict) -> str:
    """The harness's ``doc_to_text``."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def build_prompt(subject: str, exemplars: Sequence[dict], row: dict) -> str:
    """Description, the exemplars with their answers, then the question; ends with ``"Answer:"``."""
    shots = "".join(format_question(ex) + TARGET_DELIMITER + CHOICES[ex["answer"]] + FEWSHOT_DELIMITER
                    for ex in exemplars)
    return description(subject) + shots + format_question(row)


def dev_exemplars(dev: Sequence[dict], num_fewshot: int) -> dict[str, list[dict]]:
    """First ``num_fewshot`` dev rows of each subject, in file order (the ``first_n`` sampler)."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for row in dev:
        by_subject[row["subject"]].append(row)
    return {s: rows[:num_fewshot] for s, rows in by_subject.items()}


def evaluate(model: nn.Module, tokenizer, test: Sequence[dict], dev: Sequence[dict], *, num_fewshot: int = 5,
             batch_size: int = 8, device=None, predictions_path: str | Path | None = None,
             max_context: int | None = None, fast_path: bool = True, add_special_tokens: bool | None = None) -> dict:
    """k-shot MMLU accuracy by answer-letter log-likelihood.

    Rows: ``{"subject", "question", "choices": [4 str], "answer": 0..3}``. ``max_context``: the harness's
    ``max_length`` (default: the model's positions); longer prompts keep their end. ``fast_path``: one
    forward per question when each of ``" A" .. " D"`` is a single token after the prompt (exactly the
    same scores); ``False`` scores every (prompt, choice) pair separately. ``add_special_tokens``: ``None``
    (the harness's default) lets the tokenizer add its BOS, never twice.

    Returns ``{"accuracy", "accuracy_macro", "subjects": {subject: acc}, "num_examples",
    "questions_per_s"}``."""
    start = time.perf_counter()
    shots = dev_exemplars(dev, num_fewshot)
    prompts = []
    for row in test:
        exemplars = shots.get(row["subject"], [])
        if len(exemplars) < num_fewshot:
            raise ValueError(f"MMLU subject '{row['subject']}' has {len(exemplars)} dev rows, "
                             f"fewer than num_fewshot={num_fewshot}")
        prompts.append(build_prompt(row["subject"], exemplars, row))
    scores = choice_loglikelihoods(model, tokenizer, prompts, batch_size=batch_size, device=device,
                                   max_context=max_context, fast_path=fast_path,
                                   add_special_tokens=add_special_tokens)
    elapsed = time.perf_counter() - start

    records = []
    for i, (row, lls) in enumerate(zip(test, scores)):
        prediction = max(range(len(lls)), key=lambda c: (lls[c], -c))  # np.argmax: first maximum
        records.append({"index": i, "subject": row["subject"], "answer": int(row["answer"]),
                        "prediction": prediction, "loglikelihoods": lls,
                        "correct": prediction == int(row["answer"])})
    if predictions_path is not None:
        write_jsonl(predictions_path, records)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(r["correct"])
    subjects = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    n = len(records)
    result = {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
              "accuracy_macro": sum(subjects.values()) / len(subjects) if subjects else 0.0,
              "subjects": subjects,
              "num_examples": n,
              "questions_per_s": n / elapsed if elapsed > 0 else 0.0}
    log.info("mmlu: accuracy %.4f (macro %.4f) on %d questions, %d subjects (%.2f questions/s)",
             result["accuracy"], result["accuracy_macro"], n, len(subjects), result["questions_per_s"])
    return result


def choice_loglikelihoods(model: nn.Module, tokenizer, prompts: Sequence[str], *, choices: Sequence[str] = CHOICES,
                          batch_size: int = 8, device=None, max_context: int | None = None, fast_path: bool = True,
                          add_special_tokens: bool | None = None) -> list[list[float]]:
    """``log p(" " + choice | prompt)`` for every prompt and choice, with the harness's tokenisation."""
    device = device or model_device(model)
    max_context = max_context or max_positions(model, tokenizer)
    rows, targets, owner = [], [], []  # owner: (prompt index, choice indices) of each model row
    for i, prompt in enumerate(prompts):
        pairs = [encode_pair(tokenizer, prompt, TARGET_DELIMITER + c, add_special_tokens) for c in choices]
        context_enc = pairs[0][0]  # the same context for every choice
        if fast_path and all(len(cont) == 1 for _, cont in pairs):
            # (context + [token])[-(max_context + 1):][:-1] == context[-max_context:] for every choice
            row = context_enc[-max_context:]
            rows.append(row)
            targets.append([(len(row) - 1, cont[0]) for _, cont in pairs])
            owner.append((i, list(range(len(choices)))))
        else:
            for c, (ctx, cont) in enumerate(pairs):
                row, target = pair_row(ctx, cont, max_context)
                rows.append(row)
                targets.append(target)
                owner.append((i, [c]))
    with evaluating(model):
        scored = score_positions(model, rows, targets, pad=pad_token_id(tokenizer), batch_size=batch_size,
                                 device=device)
    out = [[0.0] * len(choices) for _ in prompts]
    for (i, cs), values in zip(owner, scored):
        if len(cs) == 1:
            out[i][cs[0]] = sum(values)
        else:
            for c, v in zip(cs, values):
                out[i][c] = v
    return out
