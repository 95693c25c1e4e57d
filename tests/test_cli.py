"""The command line as a user runs it: a multirun sweep places one complete result per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def test_multirun_with_the_parallel_launcher_writes_one_result_per_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SPEFT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "run.py", "-m", "debug=fast", "logger=none", "density=lora:4,lora:8",
           "hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    entries = sorted(json.loads(p.read_text())["budget"]["entries"] for p in results)
    assert all(json.loads(p.read_text())["status"] == "completed" for p in results)
    assert entries == [4 * 768 * 24, 8 * 768 * 24]
