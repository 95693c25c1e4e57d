"""task=code and ``speft.evaluation.code`` against lm-evaluation-harness 0.4.13 itself (the records that
``experiments/crosscheck/lm_eval_code.py`` wrote by running the harness's ``humaneval`` and ``mbpp`` tasks,
``tests/data/lm_eval/code_<model>.json``): prompts, token ids, stop strings, completions, the programs
executed and their verdicts; and the task's data, opt-in and end-to-end runs on a tiny Llama."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys

import pytest

from speft.config import validate
from speft.evaluation import code
from speft.evaluation.generation import encode, generate_until
from speft.evaluation.sandbox import Limits
from speft.pipeline import run
from speft.registry import ConfigError
from speft.tasks.base import DataError
from speft.tasks.code import Code, CodeConfig

from .conftest import ROOT, compose_cfg
from .test_eval_lm_eval_reference import digest, model_and_tokenizer, tokenizer
from .test_lm_tasks import FAST, tiny_lm  # noqa: F401 - the tiny Llama fixture

REF = ROOT / "tests" / "data" / "lm_eval"
MBPP_FIXTURE = ROOT / "tests" / "data" / "code" / "mbpp.jsonl"
SMOLLM2 = pytest.param("smollm2_135m", marks=pytest.mark.slow)  # a few minutes of generation on 2 CPU cores
MODELS = ["tiny_bos_llama", SMOLLM2]
OPT_IN = "task.allow_code_execution=true"


@functools.cache
def reference(name: str) -> dict:
    return json.loads((REF / f"code_{name}.json").read_text())


@functools.cache
def problems(benchmark: str) -> dict[str, code.Problem]:
    """Our problems for the records' items: HumanEval's first four; MBPP from the fixture through the task."""
    if benchmark == "humaneval":
        return {t: code.humaneval_problem(p) for t, p in list(code.humaneval_problems().items())[:4]}
    task = Code(CodeConfig(benchmark="mbpp", eval_file=str(MBPP_FIXTURE), allow_code_execution=True))
    task.mbpp()
    return task.problems


def items(name: str, benchmark: str) -> list[tuple[code.Problem, dict]]:
    ref = reference(name)[benchmark]
    prefix = "MBPP/" if benchmark == "mbpp" else ""
    ours = problems(benchmark)
    assert len(ref) == len(ours)
    return [(ours[f"{prefix}{r['task_id']}"], r) for r in ref]


@pytest.mark.parametrize("benchmark", code.BENCHMARKS)
@pytest.mark.parametrize("name", ["tiny_bos_llama", "smollm2_135m"])
def test_prompts_stop_strings_and_token_ids_equal_the_harness(name, benchmark):
    tok = tokenizer(name)
    stop = code.HUMANEVAL_STOP if benchmark == "humaneval" else code.MBPP_STOP
    for ours, ref in items(name, benchmark):
        assert ours.prompt == ref["prompt"]
        assert digest(encode(tok, ours.prompt)) == ref["prompt_ids"]
        assert tuple(ref["until"]) == stop


@pytest.mark.parametrize("benchmark", code.BENCHMARKS)
@pytest.mark.parametrize("name", MODELS)
def test_completions_programs_and_verdicts_equal_the_harness(name, benchmark):
    model, tok = model_and_tokenizer(name)
    settings = reference(name)["settings"]
    pairs = items(name, benchmark)
    completions = generate_until(model, tok, [p.prompt for p, _ in pairs], stop=pairs[0][1]["until"],
                                 max_new_tokens=settings["max_gen_toks"], batch_size=settings["batch_size"])
    assert completions == [r["completion"] for _, r in pairs]
    records = code.execute([p for p, _ in pairs], completions, limits=Limits(timeout_s=10))
    for (ours, ref), rec in zip(pairs, records):
        program = ours.program(ref["completion"])
        assert program == ref["program"]
        assert hashlib.sha256(program.encode()).hexdigest() == ref["program_sha256"]
        assert rec["passed"] == ref["passed"], (ref["task_id"], rec["stderr"])
    assert code.pass_at_1(records) == pytest.approx(reference(name)[f"{benchmark}_pass_at_1"])


def test_a_passing_program_passes_and_mbpp_canonical_code_scores_one():
    """The verdict is not always False: the fixture's own solutions pass their tests, a wrong one fails."""
    ps = list(problems("mbpp").values())
    rows = {r["task_id"]: r for r in map(json.loads, MBPP_FIXTURE.read_text().splitlines())}
    canonical = [rows[int(p.task_id.removeprefix("MBPP/"))]["code"] for p in ps]
    records = code.execute(ps, canonical)
    assert code.pass_at_1(records) == 1.0, records
    assert not code.execute(ps[:1], ["def sum_of_squares(nums):\n  return 0"])[0]["passed"]


# --------------------------------------------------------------------------- the task


def test_mbpp_takes_the_harness_exemplars_in_order_and_the_test_ids():
    task = Code(CodeConfig(benchmark="mbpp", eval_file=str(MBPP_FIXTURE), allow_code_execution=True))
    rows = task.mbpp()
    assert [r["task_id"] for r in rows] == ["MBPP/11", "MBPP/12", "MBPP/13"]
    prompt = task.problems["MBPP/11"].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert prompt.index("similar_elements") < prompt.index("is_not_prime") < prompt.index("heap_queue_largest")
    one = Code(CodeConfig(benchmark="mbpp", eval_file=str(MBPP_FIXTURE), num_fewshot=1, allow_code_execution=True))
    one.mbpp()
    assert one.problems["MBPP/11"].prompt.count("[DONE]") == 1


def test_opt_in_is_required_before_anything_loads(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ConfigError, match="task.allow_code_execution=true"):
        validate(compose_cfg("task=code", "model=smollm2_135m"))
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")  # the harness's switch
    assert validate(compose_cfg("task=code", "model=smollm2_135m")).task.name == "code"
    env = {k: v for k, v in os.environ.items() if k != "HF_ALLOW_CODE_EVAL"}
    proc = subprocess.run([sys.executable, "run.py", "task=code", "model=smollm2_135m", "logger=none",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "task.allow_code_execution=true" in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["task.benchmark=apps"], "Valid choices: humaneval, mbpp"),
    (["task.num_fewshot=1"], "humaneval has 0 exemplar"),
    (["task.benchmark=mbpp", "task.num_fewshot=4"], "mbpp has 3 exemplar"),
    (["task.train_data=codealpaca"], "Valid choices: codefeedback, fixture"),
    (["task.exec_timeout_s=0"], "exec_timeout_s"),
])
def test_bad_code_settings_name_the_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("task=code", OPT_IN, *overrides))


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Code(CodeConfig(benchmark="mbpp", eval_file=str(tmp_path / "none.jsonl"), allow_code_execution=True)).mbpp()
    bad = tmp_path / "mbpp.jsonl"
    malformed = {"task_id": 14, "text": "x", "test_list": ["assert 1"]}  # no code, one test
    bad.write_text(MBPP_FIXTURE.read_text() + json.dumps(malformed) + "\n")
    with pytest.raises(DataError, match="task 14: not an MBPP record"):
        Code(CodeConfig(benchmark="mbpp", eval_file=str(bad), allow_code_execution=True)).mbpp()
    no_fewshot = tmp_path / "tests_only.jsonl"
    no_fewshot.write_text("".join(line + "\n" for line in MBPP_FIXTURE.read_text().splitlines()[3:]))
    with pytest.raises(DataError, match="tasks 2, 3, 4 of the prompt split"):
        Code(CodeConfig(benchmark="mbpp", eval_file=str(no_fewshot), allow_code_execution=True)).mbpp()


def test_the_fixture_trains_under_pissas_prompt():
    task = Code(CodeConfig(train_data="fixture", allow_code_execution=True))
    train = task.load_train()
    assert len(train) == 32 and all(r["response"].startswith("def ") for r in train)
    prompt, response = task.texts(train[0])
    assert prompt.endswith(f"### Instruction:\n{train[0]['prompt']}\n\n### Response:")
    assert response == train[0]["response"] + "\n"  # PiSSA's target: output, newline, then EOS


@pytest.mark.parametrize("benchmark", code.BENCHMARKS)
def test_code_end_to_end_on_a_tiny_llama(tiny_lm, benchmark, tmp_path):  # noqa: F811 - the fixture
    extra = ["task.eval_file=" + str(MBPP_FIXTURE)] if benchmark == "mbpp" else ["task.max_eval_examples=3"]
    cfg = compose_cfg(*FAST, "task=code", "model=smollm2_135m", *tiny_lm, OPT_IN, "task.train_data=fixture",
                      f"task.benchmark={benchmark}", "task.max_new_tokens=8", "task.eval_batch_size=2", *extra)
    run(cfg, run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed", data["error"]
    assert set(data["metrics"]) == {"test/pass_at_1"} and data["main_metric"] == "test/pass_at_1"
    records = [json.loads(line) for line in (tmp_path / "code_test.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {"task_id", "completion", "passed", "status", "stderr"} <= set(records[0])
    assert data["metrics"]["test/pass_at_1"] == pytest.approx(sum(r["passed"] for r in records) / 3)
