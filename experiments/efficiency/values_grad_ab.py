"""In a real training step, with and without the sampled plan: SmolLM2-135M's shape (random weights, 4 × 128
tokens, all linear layers) on a stored grad mask, one thread, both variants in one process, interleaved
(4 rounds × 1 timed step each after a warm-up step); prints the median step and values' gradient seconds.

Usage: python experiments/efficiency/values_grad_ab.py <masks file written by speft.tools.bench --masks-file> <rank>
"""
import dataclasses
import json
import statistics
import sys
import time

import torch

from speft.sparse import layer as sparse_layer
from speft.tools import bench

torch.set_num_threads(1)
path, rank = sys.argv[1], int(sys.argv[2])
mask_file = f"{path}.r{rank}.indices.pt"
torch.save(torch.load(path)["masks"][rank], mask_file)
args = bench.parse_args(["--shape=smollm2-135m", f"--rank={rank}", "--worker=sparse", f"--mask-file={mask_file}"])
model, params = bench.build(args, "sparse")
model.train()
optimizer = torch.optim.AdamW(params, lr=1e-4)
inputs = bench.batch_inputs(args, torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0)))
timer = bench.ValuesGradTimer("cpu")
layers = list(sparse_layer.sparse_layers(model).values())
measured = {"sampled": [], "without_sampled": []}
with_cost = sparse_layer.PLAN_COSTS["cpu"]
for _ in range(4):
    for variant in measured:
        sparse_layer.PLAN_COSTS["cpu"] = with_cost if variant == "sampled" else dataclasses.replace(with_cost,
                                                                                                     sampled=None)
        for layer in layers:
            layer._plan_key = None  # rebuild the plans under this cost table
        for step in range(2):
            timer.take()
            t0 = time.perf_counter()
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                measured[variant].append((time.perf_counter() - t0, timer.take()))
print(json.dumps({"rank": rank, **{v: {"step_s": round(statistics.median(s for s, _ in m), 3),
                                       "values_grad_s": round(statistics.median(g for _, g in m), 3)}
                                   for v, m in measured.items()}}))
