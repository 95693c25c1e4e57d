"""Sweeps: the submitit launcher (local executor, as on a cluster), a failing job recorded without
losing the others, re-launches that skip completed runs and never overwrite a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from speft.pipeline import run
from speft.registry import ConfigError

from .conftest import CONF, FEW_EVAL, ROOT, compose_cfg


def sweep(tmp_path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "SPEFT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "run.py", "-m", "debug=fast", "logger=none", "method.save_adapter=false", FEW_EVAL,
           f"hydra.sweep.dir={tmp_path}/sweep", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(tmp_path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))}


def test_submitit_local_launcher_runs_every_job(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "metric=grad,snip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = results(tmp_path)
    assert sorted(r["config"]["metric"]["name"] for r in found.values()) == ["grad", "snip"]
    assert all(r["status"] == "completed" for r in found.values())
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # submitit's job folders, as on SLURM


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failing job needs a machine without CUDA")
def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path):
    proc = sweep(tmp_path, "trainer.device=cuda,cpu")
    assert proc.returncode != 0  # the sweep reports the failure at its end
    found = results(tmp_path)
    by_device = {r["config"]["trainer"]["device"]: r for r in found.values()}
    assert by_device["cpu"]["status"] == "completed" and by_device["cpu"]["metrics"]
    failed = by_device["cuda"]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] and failed["error"]["message"] and failed["error"]["traceback"]


def test_slurm_launcher_config_composes_with_cluster_options():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.array_parallelism=4", "hydra.launcher.gpus_per_node=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.array_parallelism, launcher.gpus_per_node) == ("gpu", 4, 2)
    assert launcher.timeout_min == 720 and launcher.max_num_timeout == 3  # requeued on a time limit


def test_skip_completed_returns_the_recorded_result_and_never_overwrites(tmp_path):
    first = run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false"), run_dir=tmp_path)
    path = tmp_path / "results.json"
    before = path.read_text()

    again = run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false", "skip_completed=true"),
                run_dir=tmp_path)
    assert again.model is None and again.metrics == first.metrics
    assert path.read_text() == before

    with pytest.raises(ConfigError, match="skip_completed=true"):  # without the flag: refuse, keep the file
        run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="differs in: metric"):  # another config in the same folder
        run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false", "metric=snip",
                        "skip_completed=true"), run_dir=tmp_path)
    # settings that do not change what a run computes (checkpoint period, resume) do not make it another config
    same = run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false", "skip_completed=true",
                           "trainer.checkpoint_every_steps=7", "resume=never"), run_dir=tmp_path)
    assert same.model is None and same.metrics == first.metrics
    assert path.read_text() == before


def test_a_failed_result_is_run_again_under_skip_completed(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "config": {}}))
    out = run(compose_cfg("debug=fast", "logger=none", "method.save_adapter=false", "skip_completed=true"),
              run_dir=tmp_path)
    assert out.model is not None
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"


def test_skip_completed_must_be_a_boolean():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="skip_completed"):
        compose_cfg("skip_completed=maybe")


def test_job_numbers_reuse_a_jobs_own_folder_and_give_the_others_fresh_ones(tmp_path):
    from hydra_plugins.speft_sweeper.speft_sweeper import earlier_jobs, job_numbers, next_job_number

    for n, overrides in ((0, "- a=1\n"), (1, "- a=2\n"), (3, "- a=3\n")):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        (tmp_path / str(n) / ".hydra" / "overrides.yaml").write_text(overrides)
    (tmp_path / "7").mkdir()  # a folder without a record still takes its number
    earlier = earlier_jobs(tmp_path)
    assert earlier == {("a=1",): 0, ("a=2",): 1, ("a=3",): 3} and next_job_number(tmp_path) == 8
    fresh = iter(range(8, 100))
    assert job_numbers([["a=2"], ["a=9"], ["a=1"], ["a=8"]], earlier, fresh) == [1, 8, 0, 9]


def test_a_second_launch_adds_its_jobs_without_touching_the_first(tmp_path):
    """The sweep folder grows: new jobs get new folders, the first launch's results and record stay; re-launching
    the same sweep skips its completed jobs in their own folders; an equal config spelled otherwise is reused."""
    small = ["trainer.max_steps=1", "task.max_eval_examples=8", "skip_completed=true"]
    assert sweep(tmp_path, *small, "metric=grad,snip").returncode == 0
    root = tmp_path / "sweep"
    first = {n: (root / n / "results.json").read_bytes() for n in ("0", "1")}
    record = (root / "multirun.yaml").read_text()

    proc = sweep(tmp_path, *small, "metric=magnitude,grad")  # one new job, one of the first launch's
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {n: (root / n / "results.json").read_bytes() for n in ("0", "1")} == first  # untouched
    assert (root / "multirun.1.yaml").read_text() == record and "magnitude" in (root / "multirun.yaml").read_text()
    found = results(tmp_path)
    assert sorted(found) == ["0", "1", "2"] and found["2"]["config"]["metric"]["name"] == "magnitude"
    assert "/sweep/0 holds a completed result" in proc.stdout + proc.stderr  # grad: its own folder, skipped

    proc = sweep(tmp_path, *small, "metric=gradient")  # the alias: the same config as grad, other overrides
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((root / "3" / "reused.json").read_text()) == {"results": str(root / "0" / "results.json")}
    assert not (root / "3" / "results.json").exists() and sorted(results(tmp_path)) == ["0", "1", "2"]
