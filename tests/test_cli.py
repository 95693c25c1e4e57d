"""The command line as a user runs it: a multirun sweep places one complete result per job."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from hydra.core.global_hydra import GlobalHydra

from .conftest import FEW_EVAL, ROOT


def test_multirun_with_the_parallel_launcher_writes_one_result_per_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SPEFT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "run.py", "-m", "debug=fast", "logger=none", FEW_EVAL, "density=lora:4,lora:8",
           "hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    entries = sorted(json.loads(p.read_text())["budget"]["entries"] for p in results)
    assert all(json.loads(p.read_text())["status"] == "completed" for p in results)
    assert entries == [4 * 768 * 24, 8 * 768 * 24]
    # hydra.job.name: the log is run.log (the entry point's name), not cli.log after the module with the main
    assert all((p.parent / "run.log").is_file() and not (p.parent / "cli.log").exists() for p in results)


def test_a_job_refused_by_preflight_records_a_failed_result_and_the_sweep_goes_on(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SPEFT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "run.py", "-m", "debug=fast", "logger=none", FEW_EVAL, "method=lora", "mask=reselect,static",
           "method.save_adapter=false", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "method=lora has none" in proc.stderr
    found = {json.loads(p.read_text())["config"]["mask"]["name"]: json.loads(p.read_text())
             for p in (tmp_path / "sweep").glob("*/results.json")}
    assert found["reselect"]["status"] == "failed" and "method=lora has none" in found["reselect"]["error"]["message"]
    assert found["static"]["status"] == "completed"


def test_a_single_run_refused_by_preflight_leaves_no_folder(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "run.py", "method=lora", "mask=reselect", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Invalid configuration: mask=reselect" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_sweep_objective_is_the_tasks_main_metric():
    from speft.cli import objective
    from speft.pipeline import RunResult

    metrics = {"validation/accuracy": 0.7, "validation/f1": 0.9, "validation/combined_score": 0.8}
    mrpc = RunResult(metrics=metrics, results={"main_metric": "validation/combined_score"}, model=None)
    assert objective(mrpc) == 0.8
    cola = RunResult(metrics={"validation/matthews_correlation": 0.3}, model=None,
                     results={"main_metric": "validation/matthews_correlation"})
    assert objective(cola) == 0.3


def test_a_single_run_is_pre_flighted_once(tmp_path, monkeypatch):
    import speft.cli as cli
    import speft.pipeline as pipeline

    calls = []
    real = pipeline.preflight

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "preflight", counted)
    monkeypatch.setattr(pipeline, "preflight", counted)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["run.py", "debug=fast", "logger=none", "trainer.max_steps=0",
                                      "method.save_adapter=false", f"hydra.run.dir={tmp_path}/run",
                                      "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    GlobalHydra.instance().clear()  # other tests compose configs in this process
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    was_disabled, root_level = {lg: lg.disabled for lg in loggers}, logging.root.level
    try:
        cli.main()
    finally:  # hydra/job_logging=disabled raises the root level and disables every existing logger
        logging.root.setLevel(root_level)
        for lg in logging.root.manager.loggerDict.values():
            if isinstance(lg, logging.Logger):
                lg.disabled = was_disabled.get(lg, False)
    assert len(calls) == 1  # by the callback; the run reuses its plan
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
