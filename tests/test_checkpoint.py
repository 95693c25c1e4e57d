"""Checkpoints and exact resume (issue 12 A): a run killed with SIGKILL at an arbitrary micro-batch and
run again ends bit for bit as an uninterrupted run; stop signals checkpoint and record ``interrupted``;
bad checkpoints and other configs are refused by name; writes are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speft.pipeline import run
from speft.registry import ConfigError
from speft.salience.scorer import ExampleStream
from speft.train import checkpoint
from speft.train.checkpoint import CheckpointError, Interrupted, StopRequest

from .conftest import ROOT, compose_cfg
from .signals import child_env, signal_after

# A few seconds per run on MiniLM: 8 micro-batches per pass (an optimizer step straddles a pass's end
# with accumulation), validation every 2 steps, a checkpoint after every step (keep 2).
SMALL = ["debug=fast", "logger=none", "trainer.num_threads=1", "trainer.batch_size=4", "task.max_train_examples=32",
         "task.max_eval_examples=16", "trainer.max_steps=6", "trainer.eval_every_steps=2",
         "metric.num_score_examples=8", "trainer.checkpoint_every_steps=1"]

# case -> (overrides, micro-batch after which the process kills itself, signal)
CASES = {
    # step 4 = micro-batches 7 and 8: killed between them, resumed from the step-3 checkpoint
    "static_mid_accumulation": (["trainer.grad_accum_steps=2"], 7, "SIGKILL"),
    # reselections at steps 2 and 4; killed in step 5, right after the second one (merged deltas kept)
    "reselect_after_update": (["mask=reselect", "mask.update_every_steps=2", "mask.num_score_examples=8"], 5,
                              "SIGKILL"),
    # regrow at step 2 (micro-batch 4); killed in the next step's accumulation
    "regrow_after_update": (["mask=regrow", "mask.update_every_steps=2", "mask.num_score_examples=8",
                             "trainer.grad_accum_steps=2"], 5, "SIGKILL"),
    "lora": (["method=lora"], 4, "SIGKILL"),
    "full": (["method=full", "trainer.checkpoint_every_steps=2", "trainer.keep_checkpoints=1"], 5, "SIGKILL"),
    # SLURM's warning: a checkpoint at the next step boundary, status interrupted, exit 128 + 10
    "static_sigusr1": ([], 3, "SIGUSR1"),
    # Ctrl-C: the same clean stop (one line, no traceback, exit 130), then the same command resumes
    "static_ctrl_c": ([], 3, "SIGINT"),
}


def cli(run_dir: Path, overrides: list[str], kill: str | None = None) -> subprocess.CompletedProcess:
    env = child_env({**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}, kill)
    cmd = [sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def outcome(run_dir: Path) -> dict:
    data = json.loads((run_dir / "results.json").read_text())
    adapter = sorted((run_dir / "adapter").glob("*.safetensors")) if (run_dir / "adapter").is_dir() else []
    return {"status": data["status"], "metrics": data["metrics"], "best": data["best_metrics"],
            "history": data["history"], "steps": data["train_steps"],
            "mask": [{k: v for k, v in u.items() if k != "seconds"} for u in data["mask_updates"]],
            "adapter": [p.read_bytes() for p in adapter]}


# One case in the default run (the hardest: merged deltas of two reselections, a kill right after the
# second); the others (about a minute each on a loaded 2-core machine) with -m slow.
@pytest.mark.parametrize("case", [c if c in ("reselect_after_update", "static_ctrl_c")
                                  else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_killed_run_resumes_bit_for_bit(case, tmp_path):
    extra, micro, sig = CASES[case]
    overrides = [*SMALL, *extra]
    reference = run(compose_cfg(*overrides), run_dir=tmp_path / "reference")  # in-process: same code, same seed
    assert reference.results["status"] == "completed" and reference.results["resumed"] == 0

    killed = cli(tmp_path / "run", overrides, kill=f"{micro}:{sig}")
    number = getattr(signal, sig)
    assert killed.returncode in (-number, 128 + number), killed.stderr[-3000:]
    saved = checkpoint.checkpoints(tmp_path / "run")
    assert saved, "no checkpoint was written before the kill"
    if sig == "SIGKILL":
        assert not (tmp_path / "run" / "results.json").exists()  # killed: nothing recorded, the checkpoint stays
    else:
        interrupted = json.loads((tmp_path / "run" / "results.json").read_text())
        assert interrupted["status"] == "interrupted" and interrupted["interrupted"]["signal"] == sig
        assert interrupted["interrupted"]["step"] == saved[-1][0] == micro  # the step the signal arrived in
    if sig == "SIGINT":
        assert "Traceback" not in killed.stderr and "Rerun the same command to resume" in killed.stderr

    again = cli(tmp_path / "run", overrides)  # the same command into the same folder
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {tmp_path / 'run' / 'checkpoints'}" in again.stdout + again.stderr
    got, want = outcome(tmp_path / "run"), outcome(tmp_path / "reference")
    assert got == want
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["resumed"] == 1 and data["resumed_from_steps"] == [saved[-1][0]]
    assert not checkpoint.checkpoints(tmp_path / "run")  # a completed run removes its checkpoints


def test_a_second_ctrl_c_stops_at_once():
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers ignore it)
    try:
        with StopRequest() as stop:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the first: noted, training goes on
            assert stop.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, outer)


def test_bad_checkpoints_and_other_configs_are_refused_by_name(tmp_path, monkeypatch):
    overrides = [*SMALL, "method.save_adapter=false"]
    handler = signal.getsignal(signal.SIGTERM)
    reference = run(compose_cfg(*overrides), run_dir=tmp_path / "reference")
    with monkeypatch.context() as m, pytest.raises(Interrupted):
        signal_after(m, "4:SIGTERM")  # in-process: our handler, then Interrupted
        run(compose_cfg(*overrides), run_dir=tmp_path)
    assert signal.getsignal(signal.SIGTERM) == handler  # the handlers are put back
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [3, 4]  # keep_checkpoints=2

    with pytest.raises(ConfigError, match=r"differs in: trainer\.lr"):
        run(compose_cfg(*overrides, "trainer.lr=0.01"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="resume=never"):
        run(compose_cfg(*overrides, "resume=never"), run_dir=tmp_path)

    latest = tmp_path / "checkpoints" / "step-00000004.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"step-00000004\.pt .*truncated.*step-00000003\.pt"):
        run(compose_cfg(*overrides), run_dir=tmp_path)
    latest.write_bytes(b"\0" * len(good))  # same size, damaged content
    with pytest.raises(CheckpointError, match=r"step-00000004\.pt cannot be read"):
        run(compose_cfg(*overrides), run_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "step-00000003.pt").stat().st_size > 0  # the previous one is kept

    latest.unlink()
    latest.with_suffix(".json").unlink()
    done = run(compose_cfg(*overrides, "trainer.checkpoint_every_steps=2"), run_dir=tmp_path)  # period may change
    assert done.results["status"] == "completed" and done.results["resumed_from_steps"] == [3]
    assert done.results["history"] == reference.results["history"] and done.metrics == reference.metrics


def test_an_interrupted_write_never_looks_like_a_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"x": torch.ones(3)}, {"seed": 1}, keep=2)

    def partial(obj, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, {"x": torch.ones(3)}, {"seed": 1}, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert checkpoint.resumable(tmp_path, {"seed": 1}, "auto")["step"] == 1


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"step": step}, {}, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [4, 5]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 4
    assert checkpoint.load(tmp_path / "checkpoints" / "step-00000005.pt") == {"step": 5}


def test_differing_keys_are_dotted_and_ignore_checkpoint_settings():
    old = {"trainer": {"lr": 1e-3, "checkpoint_every_steps": 1}, "seed": 1, "resume": "auto"}
    new = {"trainer": {"lr": 2e-3, "checkpoint_every_steps": 5}, "seed": 1, "resume": "never", "x": 1}
    assert checkpoint.differing_keys(old, new) == ["trainer.lr", "x"]


def test_the_example_stream_resumes_where_it_stopped():
    a = ExampleStream(list(range(7)), seed=3)
    head = [next(a) for _ in range(10)]
    b = ExampleStream(list(range(7)), seed=3)
    b.load_state_dict(a.state_dict())
    assert [next(a) for _ in range(12)] == [next(b) for _ in range(12)]
    assert head[:7] != list(range(7)) and sorted(head[:7]) == list(range(7))


def test_resume_and_checkpoint_keys_are_validated(compose_config):
    from speft.config import validate

    with pytest.raises(ConfigError, match="resume='sometimes' is not valid. Valid choices: auto, never"):
        validate(compose_config("resume=sometimes"))
    with pytest.raises(ConfigError, match="trainer.keep_checkpoints=0 must be > 0"):
        validate(compose_config("trainer.keep_checkpoints=0"))
    assert validate(compose_config()).trainer.checkpoint_every_minutes == 5  # a kill loses minutes, not the run


@pytest.mark.slow  # a sweep, a requeue and a reference run: about 1-2 minutes
def test_submitit_requeues_a_preempted_job_that_resumes(tmp_path):
    """hydra/launcher=submitit_local, as on SLURM: submitit's preemption signal (SIGUSR2) mid-training ->
    checkpoint, results.json ``interrupted`` -> submitit's handler requeues the job -> it resumes and
    completes with the uninterrupted result."""
    reference = run(compose_cfg(*SMALL), run_dir=tmp_path / "reference")
    env = child_env({**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}, "3:SIGUSR2")
    cmd = [sys.executable, "run.py", "-m", *SMALL, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))  # .out: the log
    assert "Requeued job" in logs and "resuming from" in logs
    assert outcome(tmp_path / "sweep" / "0") == outcome(tmp_path / "reference")
    data = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    assert data["resumed_from_steps"] == [3] and reference.results["resumed"] == 0


def test_a_key_added_later_reads_as_the_value_older_runs_computed():
    old = {"trainer": {"lr": 0.001}, "task": {"name": "glue/sst2"}}  # recorded before the keys existed
    new = {"trainer": {"lr": 0.001, "head_warmup_steps": 0}, "task": {"name": "glue/sst2", "heldout_examples": None}}
    assert checkpoint.differing_keys(old, new) == []
    new["trainer"]["head_warmup_steps"] = 20
    assert checkpoint.differing_keys(old, new) == ["trainer.head_warmup_steps"]
    assert checkpoint.differing_keys(new, old) == ["trainer.head_warmup_steps"]
