"""The replication's building blocks: a held-out tuning split that never touches the reported split and
keeps the training subset, the head warm-up switch, the grid's learning-rate choice and its separation screen."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from speft import registry
from speft.config import validate
from speft.pipeline import preflight, run
from speft.registry import ConfigError
from speft.tasks.base import DataError

from .conftest import ROOT, compose_cfg

DATA = ROOT.parent / "shared" / "data"


def task(*overrides: str):
    spec = validate(compose_cfg("task=glue/sst2", *overrides))
    return registry.get("task", "glue/sst2").obj(spec.task, spec.paths.resolve("data_dir"))


def key(row: dict) -> tuple:
    return row["sentence"], row["label"]


def test_the_heldout_split_keeps_the_training_subset_and_replaces_the_dev_set():
    plain = task("task.max_train_examples=100", "task.subset_seed=0").splits()
    held = task("task.max_train_examples=100", "task.subset_seed=0", "task.heldout_examples=50")
    splits = held.splits()
    assert sorted(splits) == ["heldout", "train"] and held.eval_splits == ("heldout",)
    assert held.validation_split == "heldout" and len(splits["heldout"]) == 50
    assert [key(r) for r in splits["train"]] == [key(r) for r in plain["train"]]  # the same 100 examples
    assert not {key(r) for r in splits["heldout"]} & {key(r) for r in splits["train"]}
    dev = {key(r) for r in plain["validation"]}
    assert not {key(r) for r in splits["heldout"]} & dev  # never the reported split
    other_seed = task("task.max_train_examples=100", "task.subset_seed=0", "task.heldout_examples=50", "seed=7")
    assert other_seed.splits()["heldout"] == splits["heldout"]  # the run seed does not move it


def test_a_heldout_split_that_cannot_fit_and_one_on_an_lm_task_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"task.heldout_examples=67000 plus task.max_train_examples=1000 exceed"):
        task("task.max_train_examples=1000", "task.heldout_examples=67000").splits()
    with pytest.raises(ConfigError, match="task.heldout_examples=10: held-out training examples"):
        preflight(compose_cfg("task=gsm8k", "model=smollm2_135m", "task.heldout_examples=10"), tmp_path)


def test_head_warm_up_trains_the_head_before_scoring_and_changes_the_mask(tmp_path):
    small = ["debug=fast", "logger=none", "trainer.max_steps=1", "task.max_eval_examples=8",
             "method.save_adapter=false", "metric.cache=false"]
    warm = run(compose_cfg(*small, "trainer.head_warmup_steps=3"), run_dir=tmp_path / "warm").results
    cold = run(compose_cfg(*small), run_dir=tmp_path / "cold").results
    assert warm["head_warmup"]["steps"] == 3 and "head_warmup" not in cold
    assert warm["timings"]["head_warmup_s"] > 0
    assert warm["mask"] != cold["mask"]  # the gradients now flow through a trained head
    with pytest.raises(ConfigError, match="trainer.head_warmup_steps=-1 must be >= 0"):
        validate(compose_cfg("trainer.head_warmup_steps=-1"))


def grid_module():
    spec = importlib.util.spec_from_file_location("grid", ROOT / "experiments" / "replication" / "grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grid"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def fake_result(grid, task: str, key: str, lr: float, value: float) -> None:
    run = grid.tune_run(task, key, lr)
    (run.folder / ".hydra").mkdir(parents=True)
    (run.folder / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in ["experiment=replication", *run.overrides]))
    (run.folder / "results.json").write_text(json.dumps({"status": "completed", "main_metric": "heldout/accuracy",
                                                         "metrics": {"heldout/accuracy": value}}))


def test_the_learning_rate_grid_extends_past_an_end_and_chooses_the_best(tmp_path):
    g = grid_module()
    grid = g.Grid(tmp_path, ["glue/sst2"], [1], None, ["glue/sst2"], "glue/sst2")
    key = "sparse-random"
    assert grid.tune_lrs("glue/sst2", key) == ([2e-4, 1e-3, 5e-3], None)  # nothing run yet
    for lr, v in ((2e-4, 0.55), (1e-3, 0.69), (5e-3, 0.836)):
        fake_result(grid, "glue/sst2", key, lr, v)
    assert grid.tune_lrs("glue/sst2", key) == ([2e-4, 1e-3, 5e-3, 0.025], None)  # best at the top: one more
    fake_result(grid, "glue/sst2", key, 0.025, 0.80)
    assert grid.tune_lrs("glue/sst2", key) == ([2e-4, 1e-3, 5e-3, 0.025], 5e-3)  # now inside
    assert grid.chosen_lr() == {"glue/sst2": {key: 5e-3}}
    assert json.loads((tmp_path / "lr.json").read_text()) == {"glue/sst2": {key: 5e-3}}
    other = "sparse-grad"  # ties: the smaller step; at most EXTEND steps past the grid
    for lr, v in ((2e-4, 0.9), (1e-3, 0.9), (5e-3, 0.1)):
        fake_result(grid, "glue/sst2", other, lr, v)
    assert grid.tune_lrs("glue/sst2", other) == ([4e-5, 2e-4, 1e-3, 5e-3], None)
    fake_result(grid, "glue/sst2", other, 4e-5, 0.95)
    fake_result(grid, "glue/sst2", other, 8e-6, 0.97)
    assert grid.tune_lrs("glue/sst2", other) == ([8e-6, 4e-5, 2e-4, 1e-3, 5e-3], 8e-6)  # two extensions: stop


def test_a_task_that_does_not_separate_at_tuning_runs_no_later_stage(tmp_path, monkeypatch):
    """The screen: every method at its chosen rate; the best held-out score against the held-out majority class
    (the tables' rule: 5 points). SST-2's majority class is computed from the real data."""
    g = grid_module()
    monkeypatch.setattr(sys, "path", [str(ROOT / "experiments" / "replication"), *sys.path])
    grid = g.Grid(tmp_path, ["glue/sst2"], [1], str(DATA), ["glue/sst2"], "glue/sst2")
    monkeypatch.setattr(grid, "table_a", ["sparse-grad", "lora", "head_only"])
    assert grid.kept(["glue/sst2"], "a") == [] and grid.screen() == {}  # still tuning: waits
    scores = {"sparse-grad": (0.50, 0.58, 0.52), "lora": (0.55, 0.57, 0.56)}  # best 58.0: under majority + 5
    for key, values in scores.items():
        for lr, v in zip((2e-4, 1e-3, 5e-3), values):
            fake_result(grid, "glue/sst2", key, lr, v)
    screen = grid.screen()["glue/sst2"]
    assert screen["best_key"] == "sparse-grad" and screen["best"] == 58.0
    assert screen["majority"] == pytest.approx(54.6, abs=0.01)  # the 500 held-out SST-2 examples' majority class
    assert not screen["separates"] and grid.kept(["glue/sst2"], "a") == []
    assert json.loads((tmp_path / "screen.json").read_text())["glue/sst2"] == screen
    (tmp_path / "screen.json").write_text(json.dumps({"glue/sst2": {**screen, "best": 60.0, "separates": True}}))
    grid.lr = grid.chosen_lr()
    assert {r.folder.parts[-2] for r in grid.a()} == {"sparse-grad", "lora", "head_only"}  # one seed each
