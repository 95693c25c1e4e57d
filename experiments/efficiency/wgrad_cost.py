"""Side by side, interleaved, one thread: the values' gradient of all SmolLM2-135M target layers with
the chosen plans vs the dense product, 512 tokens, on the grad masks a bench run stored.

Usage: python experiments/efficiency/wgrad_cost.py <masks file written by speft.tools.bench --masks-file>
"""
import sys
import time

import torch

from speft.sparse.layer import build_plan, candidate_plans
from speft.tools.bench import target_layer_shapes

torch.set_num_threads(1)
saved = torch.load(sys.argv[1])["masks"]
shapes = target_layer_shapes("smollm2-135m")
T = 512
g = torch.Generator().manual_seed(0)
data = {s: (torch.randn(T, s[0], generator=g), torch.randn(T, s[1], generator=g)) for s in set(shapes.values())}
for r in sorted(saved):
    m = saved[r]
    assert set(m) == set(shapes), (len(m), len(shapes))
    planned = {n: build_plan(m[n], shapes[n]) for n in shapes}
    dense = {n: candidate_plans(m[n], shapes[n])[0][0] for n in shapes}
    res = {"planned": [], "dense": []}
    for _rep in range(3):
        for name, plans in (("dense", dense), ("planned", planned)):
            t = time.perf_counter()
            for n, p in plans.items():
                gg, xx = data[shapes[n]]
                p.values_grad(gg, xx)
            res[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[1] for k, v in res.items()}
    frac = sum(p.computed for p in planned.values()) / sum(p.dense for p in planned.values())
    print({"rank": r, "structured_fraction": round(frac, 3), "dense_s": round(med["dense"], 3),
           "planned_s": round(med["planned"], 3), "planned_vs_dense": round(med["planned"] / med["dense"], 3),
           "runs": {k: [round(x, 3) for x in v] for k, v in res.items()}})
