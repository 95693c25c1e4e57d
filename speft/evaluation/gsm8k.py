"""GSM8K as lm-evaluation-harness 0.4.13's ``gsm8k`` task (version 3.0): k-shot greedy generation, scored
by exact match of the extracted number.

What is equal to the harness (``HFLM`` with its defaults, no chat template), checked against lm-eval 0.4.13
itself in ``tests/test_eval_lm_eval_reference.py``: the prompt string of every problem (with
``fewshot=harness`` exemplars, i.e. :func:`fewshot_exemplars`), its token ids (the tokenizer's BOS added
once, as the harness), the completion string, the strict and flexible extractions and their exact-match
scores. Not covered: the harness's chat-template and multi-turn options.

Followed from EleutherAI/lm-evaluation-harness:

- ``lm_eval/tasks/gsm8k/gsm8k.yaml``: ``doc_to_text: "Question: {{question}}\\nAnswer:"``,
  ``doc_to_target: "{{answer}}"`` (the full worked solution), ``num_fewshot: 5`` from the train split,
  ``until: ["Question:", "</s>", "<|im_end|>"]``, ``do_sample: false``; filters ``strict-match``
  (regex ``#### (\\-?[0-9\\.\\,]+)``, take_first) and ``flexible-extract`` (regex
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, ``group_select: -1``, take_first); metric ``exact_match`` with
  ``ignore_case: true``, ``ignore_punctuation: false``,
  ``regexes_to_ignore: [",", "\\$", "(?s).*#### ", "\\.$"]``.
- ``lm_eval/filters/extraction.py`` (``RegexFilter``): ``findall``, take match ``group_select``; a tuple
  (several groups) gives its first non-empty group; ``strip()``; no match gives ``"[invalid]"``.
- ``lm_eval/api/metrics.py`` (``exact_match_hf_evaluate``): each regex of ``regexes_to_ignore`` is removed
  with ``re.sub`` from prediction and reference (the reference is the full answer, so ``(?s).*#### ``
  leaves its number), then both are lower-cased and compared.
- ``lm_eval/api/samplers.py`` / ``lm_eval/api/task.py`` (``fewshot_context``): each exemplar is
  ``doc_to_text + target_delimiter (" ") + doc_to_target + fewshot_delimiter ("\\n\\n")``, followed by the
  question's ``doc_to_text``. The default sampler draws ``rnd.sample(train, k)`` for each test problem in
  order, from one ``random.Random(1234)`` (``fewshot_random_seed``): :func:`fewshot_exemplars`.
- Generation and stop strings: see :mod:`speft.evaluation.generation`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from speft.evaluation.generation import generate_until
from speft.utils import write_jsonl

log = logging.getLogger(__name__)

STOP = ("Question:", "</s>", "<|im_end|>")
STRICT_REGEX = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_REGEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
FLEXIBLE_GROUP = -1  # the last number in the completion
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"  # RegexFilter's fallback when nothing matches
FEWSHOT_SEED = 1234  # simple_evaluate's fewshot_random_seed


def _regex_filter(text: str, regex: re.Pattern, group_select: int) -> str:
    matches = regex.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = [m for m in match if m][0]
    return match.strip()


def extract_strict(text: str) -> str:
    """The number after the first ``#### `` (the ``strict-match`` filter), or ``"[invalid]"``."""
    return _regex_filter(text, STRICT_REGEX, 0)


def extract_flexible(text: str) -> str:
    """The last number-like span of the text (the ``flexible-extract`` filter), or ``"[invalid]"``."""
    return _regex_filter(text, FLEXIBLE_REGEX, FLEXIBLE_GROUP)


def normalize(s: str) -> str:
    """``exact_match``'s preprocessing: remove ``regexes_to_ignore`` in order, then lower-case."""
    for pattern in REGEXES_TO_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def target_answer(answer: str) -> str:
    """The gold number of a worked solution ``"... #### 72"`` (the text after the last ``#### ``)."""
    return answer.split("#### ")[-1].strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match as the harness scores it: the reference is the full worked solution."""
    return normalize(prediction) == normalize(answer)


def format_example(row: dict, with_answer: bool) -> str:
    text = f"Question: {row['question']}\nAnswer:"
    return f"{text} {row['answer']}\n\n" if with_answer else text


def build_prompt(question: str, exemplars: Sequence[dict]) -> str:
    """k-shot prompt: ``Question: q1\\nAnswer: a1\\n\\n ... Question: q\\nAnswer:`` (no description)."""
    return "".join(format_example(ex, True) for ex in exemplars) + format_example({"question": question}, False)


def fewshot_exemplars(train: Sequence[dict], num_problems: int, num_fewshot: int = 5,
                      seed: int = FEWSHOT_SEED) -> list[list[dict]]:
    """The harness's exemplars for test problems ``0 .. num_problems - 1``: one ``random.Random(seed)``
    drawing ``sample(train, num_fewshot)`` per problem, in test order (the train rows in the official
    file order). Pass the result as ``exemplars`` to :func:`evaluate` to reproduce the harness's prompts."""
    rnd = random.Random(seed)
    return [[train[i] for i in rnd.sample(range(len(train)), num_fewshot)] for _ in range(num_problems)]


def evaluate(model: nn.Module, tokenizer, problems: Sequence[dict],
             exemplars: Sequence[dict] | Sequence[Sequence[dict]], *, max_new_tokens: int = 256,
             batch_size: int = 8, stop: tuple[str, ...] = STOP, device=None,
             predictions_path: str | Path | None = None, max_context: int | None = None,
             add_special_tokens: bool | None = None) -> dict[str, float]:
    """Greedy k-shot GSM8K accuracy under both harness filters.

    ``problems``: rows ``{"question", "answer"}``. ``exemplars``: one list of rows shared by every
    problem (fixed k-shot), or one list per problem (e.g. :func:`fewshot_exemplars`).
    ``max_context``: the harness's ``max_length`` (prompt + generation, default: the model's positions);
    prompts are left-truncated to ``max_context - max_new_tokens`` tokens.
    ``predictions_path``: one JSON line per problem, in input order.
    ``add_special_tokens``: ``None`` (the harness's default) lets the tokenizer add its BOS, never twice;
    ``True``/``False`` is the harness's ``add_bos_token``.

    Returns ``{"strict_match", "flexible_extract", "num_examples", "problems_per_s"}``."""
    per_problem = bool(exemplars) and not isinstance(exemplars[0], dict)
    if per_problem and len(exemplars) != len(problems):
        raise ValueError(f"{len(exemplars)} exemplar lists for {len(problems)} problems")
    prompts = [build_prompt(p["question"], exemplars[i] if per_problem else exemplars) for i, p in enumerate(problems)]
    start = time.perf_counter()
    completions = generate_until(model, tokenizer, prompts, stop=stop, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, device=device, max_context=max_context,
                                 add_special_tokens=add_special_tokens)
    elapsed = time.perf_counter() - start

    records = []
    for i, (problem, completion) in enumerate(zip(problems, completions)):
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        records.append({"index": i, "question": problem["question"], "target": target_answer(problem["answer"]),
                        "completion": completion, "strict": strict, "flexible": flexible,
                        "strict_correct": is_correct(strict, problem["answer"]),
                        "flexible_correct": is_correct(flexible, problem["answer"])})
    if predictions_path is not None:
        write_jsonl(predictions_path, records)
    n = len(records)
    result = {"strict_match": sum(r["strict_correct"] for r in records) / n if n else 0.0,
              "flexible_extract": sum(r["flexible_correct"] for r in records) / n if n else 0.0,
              "num_examples": n,
              "problems_per_s": n / elapsed if elapsed > 0 else 0.0}
    log.info("gsm8k: strict %.4f, flexible %.4f on %d problems (%.2f problems/s)", result["strict_match"],
             result["flexible_extract"], n, result["problems_per_s"])
    return result

