"""What a user reads when something is off: "did you mean" for unknown options, --help without the
internal schema groups, one line for a new task head, clear data and path errors, LM results in the logger."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from speft.cli import check_options, option_groups
from speft.config import validate
from speft.models.loading import load_model
from speft.registry import ConfigError

from .conftest import ROOT, compose_cfg


@pytest.mark.parametrize("args, message", [
    (["metric=gard"], "unknown option metric=gard. Did you mean metric=grad"),
    (["-m", "metric=grad,snipp"], "unknown option metric=snipp. Did you mean metric=snip?"),
    (["task=glue/sst3"], "Did you mean task=glue/sst2"),
    (["+mask=statik"], "Did you mean mask=static?"),
    (["method=qlora"], "Valid choices for method: dora, full, head_only, lora, pissa, sparse"),
])
def test_unknown_options_suggest_the_closest(args, message):
    with pytest.raises(SystemExit, match=message.replace("?", r"\?").replace("(", r"\(")):
        check_options(args)


def test_known_options_sweeps_and_other_keys_pass():
    check_options(["metric=grad,snip", "task=glue/sst2", "experiment=null", "trainer.lr=0.1", "density=lora:8",
                   "metric=choice(grad,snip)", "hydra/launcher=parallel", "-m", "seed=1,2"])
    assert "schema" not in option_groups() and "glue/stsb" in option_groups()["task"]


def test_help_lists_the_groups_users_choose_from():
    out = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    task_line = next(line for line in out.splitlines() if line.startswith("task: "))
    assert "glue/cola" in task_line and "code" in task_line
    assert "metric: " in out and "schema/" not in out and "debug_task" not in out


def test_a_typo_stops_the_command_line_before_hydra():
    proc = subprocess.run([sys.executable, "run.py", "metric=gard"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Did you mean metric=grad" in proc.stderr and "Traceback" not in proc.stderr


def test_a_new_head_is_one_line_not_a_load_report(capfd, caplog):
    caplog.set_level(logging.INFO, logger="speft.models.loading")
    load_model(compose_cfg().model, "seq_cls", 2)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert "new task head classifier.bias, classifier.weight: initialised at random" in caplog.text


def test_empty_paths_are_refused():
    with pytest.raises(ConfigError, match="paths.data_dir is empty"):
        validate(compose_cfg("paths.data_dir="))


def test_the_glue_data_hint_names_the_folder_given(tmp_path, monkeypatch):
    import datasets

    from speft import registry

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = validate(compose_cfg("task=glue/sst2", f"paths.data_dir={tmp_path}"))
    task = registry.get("task", "glue/sst2").obj(spec.task, spec.paths.resolve("data_dir"))
    with pytest.raises(Exception, match=rf"no local copy at {tmp_path}/glue/SST-2 \(from paths.data_dir={tmp_path}\)"
                       r".*put train.tsv and dev.tsv at"):
        task.splits()


class Recorder:
    def __init__(self):
        self.logged, self.tables = {}, {}

    def log(self, metrics, step):
        self.logged.update(metrics)

    def log_table(self, key, columns, rows):
        self.tables[key] = (columns, rows)


def test_lm_throughput_and_predictions_reach_the_logger(tmp_path):
    from speft.recipe import log_evaluation

    rows = [{"index": i, "question": "q", "target": "1", "completion": "c", "strict": "1", "flexible": "1",
             "strict_correct": True, "flexible_correct": True} for i in range(3)]
    (tmp_path / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger = Recorder()
    log_evaluation(logger, tmp_path, {"test": {"examples": 3, "problems_per_s": 0.5}}, step=7)
    assert logger.logged == {"test/examples": 3, "test/problems_per_s": 0.5}
    columns, table = logger.tables["predictions_test"]
    assert columns[:3] == ["index", "question", "target"] and len(table) == 3
