"""Checkpoint size and write time (speft.train.checkpoint) for a model shape of ``speft.tools.bench``.

Builds the shape's model with random weights as ``python -m speft.tools.bench`` does (sparse: a random mask at
``density=lora:<rank>``, the same entry count as a salience mask), trains a few steps with AdamW so the
optimizer holds its moments, then writes the run's checkpoint content (trainable state, optimizer,
RNG states) with :func:`speft.train.checkpoint.save` ``--writes`` times and prints one JSON line:
file size, bytes per trainable entry, median write time (capture + atomic write), median step time,
and the overhead of checkpointing every 100 steps (write time / 100 step times).

    python experiments/efficiency/checkpoint_bench.py --shape minilm --method sparse
    python experiments/efficiency/checkpoint_bench.py --shape smollm2-135m --method sparse
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from speft import registry  # noqa: E402
from speft.tools import bench  # noqa: E402
from speft.train import checkpoint  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="minilm", choices=sorted(bench.SHAPES))
    p.add_argument("--method", default="sparse", choices=("sparse", "lora", "full"))
    p.add_argument("--rank", type=int, default=8, help="density lora:<rank> (sparse) or LoRA rank")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--writes", type=int, default=5, help="checkpoints written (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    args = bench.parse_args([f"--shape={a.shape}", f"--rank={a.rank}", "--device=cpu"])
    model, params = bench.build(args, a.method)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, bench.SHAPES[a.shape]["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    inputs = bench.batch_inputs(args, ids)
    times = []
    for step in range(1 + a.steps):
        t0 = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    writes, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.writes):
            t0 = time.perf_counter()
            content = {"loop": {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()},
                       "model": registry.get("method", a.method).obj.trainable_state(model, optimizer)}
            path = checkpoint.save(Path(tmp), i + 1, content, {"shape": a.shape}, keep=2)
            writes.append(time.perf_counter() - t0)
            size = path.stat().st_size
    trainable = sum(q.numel() for q in params)
    step_s, write_s = statistics.median(times), statistics.median(writes)
    row = {"shape": a.shape, "method": a.method, "rank": a.rank, "trainable": trainable, "checkpoint_bytes": size,
           "bytes_per_trainable": round(size / trainable, 2), "write_s": round(write_s, 4),
           "step_s": round(step_s, 4), "overhead_every_100_steps": round(write_s / (100 * step_s), 5),
           "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads()}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
