"""experiments/gpu/check.sh, its CPU-possible parts (QUICK=1 DEVICE=cpu): every check runs and writes its
JSON line; the GPU-only ones say why they were skipped."""

from __future__ import annotations

import json
import os
import subprocess

from .conftest import ROOT


def test_the_gpu_check_runs_its_cpu_parts_and_writes_one_line_per_check(tmp_path):
    out = tmp_path / "check.jsonl"
    proc = subprocess.run([str(ROOT / "experiments" / "gpu" / "check.sh"), "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "QUICK": "1", "DEVICE": "cpu"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = {r["check"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == ["env", "bench/tiny", "plans", "train/default", "train/default-nf4", "nccl"]
    costs = records["plans"]["costs"]  # the cost model's constants, measured on this CPU
    assert costs["gather"] > 0 and costs["block"] >= 0 and costs["sampled"] > 0
    assert records["env"]["torch"] and records["env"]["gpus"] == []
    methods = {r["method"]: r for r in records["bench/tiny"]["rows"]}
    assert set(methods) == {"sparse", "lora"} and methods["lora"]["step_vs_lora"] == 1.0
    assert methods["sparse"]["trainable"] == methods["lora"]["trainable"] > 0
    train = records["train/default"]
    assert train["status"] == "completed" and train["train_steps"] == 2
    assert train["peak_memory_mb"]["rss"] > 0 and train["memory_estimate_mb"]["peak"] > 0
    assert records["nccl"]["status"] == "skipped"
    nf4 = records["train/default-nf4"]
    assert nf4["status"] == "completed"
    assert nf4["memory_estimate_mb"]["weights"] < train["memory_estimate_mb"]["weights"]
