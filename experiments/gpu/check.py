"""The one-command GPU check: what a first GPU run has to show, one JSON line per check.

    experiments/gpu/check.sh                 # on a GPU machine: at most ~10 minutes on one H100
    QUICK=1 DEVICE=cpu experiments/gpu/check.sh   # the CPU-possible parts, small (the test suite runs this)

Checks, in order (each in its own process; a failing check is recorded and the next one runs):

* ``env``: torch, CUDA and the GPUs (name, memory), transformers, speft's git revision;
* ``bench/<shape>``: ``python -m speft.tools.bench`` in bf16 (sparse, LoRA, frozen; full on the small shape): step
  times by CUDA events and peak CUDA memory, with the ratios to LoRA and to the frozen floor; SmolLM2-135M's
  shape and a 1B Llama shape;
* ``train/gsm8k``: a short GSM8K training and evaluation of the packaged SmolLM2-135M on the device
  (``debug=fast``): status, metrics, step time, the measured peak against pre-flight's memory estimate;
* ``plans``: the backward plans' cost constants on the device (``calibrate_plans.py``; commit its ``costs``
  to ``speft/sparse/plan_costs.json`` under the device type, and the sparse layer plans structured products there);
* ``bench/smollm2-135m-nf4``: the bench on an NF4 base (sparse, QLoRA, frozen), full-size runs only;
* ``train/gsm8k-nf4``: the same training on a 4-bit base (``model.quantization=nf4``; quick: the default run's);
* ``nccl``: the same run data-parallel on two GPUs through ``torchrun`` when two are visible (else skipped).

Writes ``<out>`` (default ``experiments/gpu/check-<device>.jsonl``); commit it with the run's date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["task=gsm8k", "model=smollm2_135m", "debug=fast", "logger=none", "method.save_adapter=false",
         "task.max_eval_examples=2", "task.max_new_tokens=16"]
QUICK_TRAIN = ["debug=fast", "logger=none", "method.save_adapter=false", "trainer.max_steps=2",
               "task.max_eval_examples=16"]


def env_record(device: str) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from speft.results import git_state

    sha, dirty = git_state()
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "gpus": gpus, "git_sha": sha, "git_dirty": dirty}


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", f"timed out after {timeout:.0f} s", time.perf_counter() - t0


def bench(shape: str, device: str, quick: bool, quantization: str = "none") -> dict:
    methods = "sparse,lora" if quick else "sparse,lora,frozen" + (",full" if shape == "smollm2-135m" else "")
    if quantization != "none":
        methods = "sparse,lora,frozen"
    cmd = [sys.executable, "-m", "speft.tools.bench", "--shape", shape, "--device", device, "--rank", "16",
           "--methods", methods, "--dtype", "float32" if device == "cpu" else "bfloat16",
           "--steps", "1" if quick else "10", "--warmup", "0" if quick else "3", "--quantization", quantization]
    rc, out, err, seconds = run(cmd, 600)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary = [r for r in rows if "step_vs_lora" in r]  # the summary lines (one per method)
    return {"rc": rc, "seconds": round(seconds, 1), "rows": summary or rows, "stderr": err[-1500:] if rc else ""}


def plans(device: str, quick: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "experiments" / "gpu" / "calibrate_plans.py"), "--device", device,
           "--dtype", "float32" if device == "cpu" else "bfloat16", *(["--quick"] if quick else [])]
    rc, out, err, seconds = run(cmd, 300)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"rc": rc, "seconds": round(seconds, 1), **(rows[-1] if rows else {}), "stderr": err[-1500:] if rc else ""}


def train(device: str, quick: bool, extra: list[str], launcher: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        # quick: the default run's MiniLM instead of SmolLM2 on GSM8K, seconds on a CPU
        base = QUICK_TRAIN if quick else TRAIN
        cmd = [*(launcher or [sys.executable]), "run.py", f"trainer.device={device}", *base, *extra,
               f"hydra.run.dir={tmp}/run", f"paths.cache_dir={tmp}/cache"]
        rc, _, err, seconds = run(cmd, 900)
        path = Path(tmp, "run", "results.json")
        r = json.loads(path.read_text()) if path.exists() else {}
    timings = r.get("timings", {})
    return {"rc": rc, "seconds": round(seconds, 1), "status": r.get("status"), "metrics": r.get("metrics"),
            "train_steps": r.get("train_steps"), "training_s": timings.get("training_s"),
            "peak_memory_mb": r.get("peak_memory_mb"), "memory_estimate_mb": r.get("memory_estimate_mb"),
            "processes": r.get("processes"), "error": r.get("error"), "stderr": err[-1500:] if rc else ""}


def checks(device: str, quick: bool):
    import torch

    yield "env", lambda: env_record(device)
    for shape in (["tiny"] if quick else ["smollm2-135m", "llama-1b"]):
        yield f"bench/{shape}", lambda shape=shape: bench(shape, device, quick)
    yield "plans", lambda: plans(device, quick)
    if not quick:
        yield "bench/smollm2-135m-nf4", lambda: bench("smollm2-135m", device, quick, "nf4")
    name = "train/default" if quick else "train/gsm8k"
    yield name, lambda: train(device, quick, [])
    yield f"{name}-nf4", lambda: train(device, quick, ["model.quantization=nf4"])
    if device == "cuda" and torch.cuda.device_count() >= 2:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        yield "nccl", lambda: train(device, quick, ["trainer.batch_size=2"], launcher)
    else:
        yield "nccl", lambda: {"status": "skipped", "reason": "fewer than two GPUs visible"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1",
                   help="small shapes and the MiniLM default run (the CPU test)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device visible; DEVICE=cpu QUICK=1 runs the CPU-possible parts")
    out = args.out or ROOT / "experiments" / "gpu" / f"check-{args.device}.jsonl"
    failed = 0
    with out.open("w") as f:
        for name, fn in checks(args.device, args.quick):
            t0 = time.perf_counter()
            try:
                record = {"check": name, **fn()}
            except Exception as e:  # noqa: BLE001 - a broken check is a result too; the next one runs
                record = {"check": name, "rc": 1, "error": f"{type(e).__name__}: {e}"}
            record.setdefault("seconds", round(time.perf_counter() - t0, 1))
            failed += record.get("rc", 0) != 0 or record.get("status") not in (None, "completed", "skipped")
            line = json.dumps(record)
            f.write(line + "\n")
            f.flush()
            print(line[:400], flush=True)
    print(f"wrote {out}: {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
