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


def verdict_runs(tmp_path, cells: dict[tuple, list[float]]) -> None:
    """Table A/B-shaped runs of SST-2 from one committed tuning result: ``cells`` maps (method, metric, mask,
    selection) to one accuracy per seed."""
    template = json.loads(next((ROOT / "experiments" / "replication" / "runs" / "tune" / "glue-sst2" /
                                "sparse-grad").glob("*/results.json")).read_text())
    for (method, metric, mask, selection), values in cells.items():
        for seed, value in enumerate(values, 1):
            data = json.loads(json.dumps(template))
            cfg = data["config"]
            cfg["method"]["name"], cfg["metric"]["name"], cfg["seed"] = method, metric, seed
            cfg["mask"].update(name=mask, selection=selection)
            data.update(salience=method == "sparse", seed=seed, main_metric="validation/accuracy",
                        metrics={"validation/accuracy": value})
            stage = "a" if (mask, selection) == ("static", "global") else "b"
            folder = tmp_path / stage / f"{method}-{metric}-{mask}-{selection}" / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(data))


def test_the_verdicts_follow_their_fixed_rules_on_made_up_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(ROOT / "experiments" / "replication"), *sys.path])
    import verdicts

    from speft.report import load_records

    grad = [0.80, 0.81, 0.79, 0.80, 0.80, 0.81]  # six seeds: the sign-flip p can fall below 0.05 (1/32)
    cells = {("sparse", "grad", "static", "global"): grad,
             ("sparse", "snip", "static", "global"): [0.805, 0.812, 0.795, 0.801, 0.80, 0.812],  # on par
             ("sparse", "magnitude", "static", "global"): [0.70, 0.72, 0.69, 0.71, 0.70, 0.70],
             ("sparse", "random", "static", "global"): [0.795, 0.815, 0.785, 0.80, 0.80, 0.81],  # not clearly worse
             ("lora", "grad", "static", "global"): [0.70, 0.80, 0.90, 0.60, 0.85, 0.95],  # too noisy to decide
             ("sparse", "grad", "dynamic", "global"): [0.85, 0.86, 0.84, 0.85, 0.85, 0.86],  # dynamic clearly better
             ("sparse", "grad", "static", "local"): [0.80, 0.80, 0.79, 0.80, 0.80, 0.81]}
    verdict_runs(tmp_path, cells)
    df = load_records([tmp_path])
    df["stage"] = [r.split("/")[-4] if "/a/" in r or "/b/" in r else None for r in df["run"].map(str)]
    a, b = df[df["run"].map(str).str.contains("/a/")], df[df["run"].map(str).str.contains("/b/")]
    results = {c["claim"]: c for c in verdicts.write(tmp_path, a, b, ["glue/sst2"])}
    parts = {p["part"].split(" (")[0]: p for c in results.values() for p in c["parts"]}
    on_par = parts["grad on par with the best other metric"]
    assert "snip" in on_par["part"] and on_par["verdict"] == verdicts.REPRODUCED
    snip = cells[("sparse", "snip", "static", "global")]
    assert on_par["mean"] == pytest.approx(100 * (sum(grad) - sum(snip)) / 6)  # points
    few = verdicts.clearly_better(verdicts.paired([9.0, 10.0, 9.5, 9.0]))  # 4 pairs: p >= 1/8 at best
    assert few == verdicts.INCONCLUSIVE
    assert parts["grad clearly above magnitude"]["verdict"] == verdicts.REPRODUCED
    assert parts["grad clearly above random"]["verdict"] == verdicts.NOT_REPRODUCED
    assert results[1]["verdict"] == verdicts.NOT_REPRODUCED  # one part fails: the claim fails
    assert results[2]["verdict"] == verdicts.NOT_REPRODUCED and results[2]["parts"][0]["pairs"] == 6
    assert results[3]["verdict"] == verdicts.REPRODUCED
    assert results[4]["verdict"] == verdicts.INCONCLUSIVE
    # Fewer seeds than the grid runs: the verdicts are written but marked provisional, with what is missing.
    import tables

    assert tables.missing_seeds(a, ["glue/sst2"]) is None
    # Table B: 2 of SST-2's 10 cells (grad and fisher × 5 schedule/selection cells) hold runs, 6 seeds each
    assert tables.missing_b(b, ["glue/sst2"]) == ("Table B holds 12 of 30 runs of the kept tasks (2 of 10 cells "
                                                  "have all 3 seeds; claims 2 and 3 rest on it)")
    assert tables.missing_b(b.iloc[:0], ["glue/sst2"]).startswith("Table B holds 0 of 30 runs")
    assert tables.missing_b(b, ["glue/mrpc"]) is None  # no kept Table B task: nothing to wait for
    two = a[a["seed"].isin(sorted(a["seed"].unique())[:2])]
    why = tables.missing_seeds(two, ["glue/sst2"])
    assert why == "Table A holds 10 of 15 runs of the kept tasks (0 of 5 cells have all 3 seeds)"
    verdicts.write(tmp_path, two, None, ["glue/sst2"], provisional=why)
    assert (tmp_path / "verdicts.md").read_text().startswith(f"**Provisional**: {why}")
    assert json.loads((tmp_path / "verdicts.json").read_text())["provisional"] == why
    text = (tmp_path / "verdicts.md").read_text()
    assert "**not reproduced**" in text and "**inconclusive at this scale**" in text
    assert json.loads((tmp_path / "verdicts.json").read_text())["claims"][0]["claim"] == 1


def test_the_committed_tables_and_figures_are_what_tables_py_writes(tmp_path, monkeypatch):
    """Every committed table regenerates byte for byte from the committed runs; every figure is drawn."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "experiments" / "replication"), *sys.path])
    import tables

    here = ROOT / "experiments" / "replication"
    # run.sh writes this one (python -m speft.report.overlap); tables.py draws its figure from it
    (tmp_path / "overlap_sst2.json").write_text((here / "overlap_sst2.json").read_text())
    tables.main([str(here / "runs"), str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".csv", ".tex", ".json"))
    committed = {p.name for p in here.iterdir() if p.suffix in (".md", ".csv", ".tex", ".json")} - {"README.md"}
    assert set(written) == committed  # nothing committed that tables.py no longer writes
    assert {"table_a.md", "table_b.md", "verdicts.md", "density.md", "lm.md", "warmup.md"} <= committed
    for name in written:
        assert (tmp_path / name).read_text() == (here / name).read_text(), name
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {f"{n}.{ext}" for n in ("tuning", "table_b", "density", "overlap_sst2") for ext in ("png", "pdf")}
