"""Each candidate structure of the values' gradient timed on every target layer of the stored grad masks
(one thread, min of 3 after a warm-up), against the cost model's estimate: checks the per-layer choice
and fits the sampled product's per-entry cost (PLAN_COSTS['cpu'].sampled in speft/sparse/layer.py).

Usage: python experiments/efficiency/plan_costs.py <masks file> [<masks file> ...]
(files written by ``speft.tools.bench --masks-file``; SmolLM2-135M and MiniLM shapes). One JSON line per file and rank.
"""
import json
import statistics
import sys
import time

import torch

from speft.sparse.layer import candidate_plans
from speft.tools.bench import target_layer_shapes

torch.set_num_threads(1)


def best_time(fn) -> float:
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


for path in sys.argv[1:]:
    saved = torch.load(path)
    shape = saved["key"]["shape"]
    shapes = target_layer_shapes(shape)
    tokens = saved["key"]["batch"] * saved["key"]["seq"]
    g = torch.Generator().manual_seed(0)
    data = {}
    for r in sorted(saved["masks"]):
        chosen = fastest = dense = no_sampled = 0.0
        ratios = []
        for name, idx in saved["masks"][r].items():
            s = shapes[name]
            if s not in data:
                data[s] = (torch.randn(tokens, s[0], generator=g), torch.randn(tokens, s[1], generator=g))
            gg, xx = data[s]
            cands = candidate_plans(idx.to(torch.int32), s)
            times = [best_time(lambda p=p, gg=gg, xx=xx: p.values_grad(gg, xx)) for p, _ in cands]
            costs = [c for _, c in cands]
            chosen += times[costs.index(min(costs))]
            fastest += min(times)
            dense += times[0]
            old = [c for (p, c) in cands if p.kind != "sampled"]
            no_sampled += times[costs.index(min(old))]
            kinds = [p.kind for p, _ in cands]
            if "sampled" in kinds:  # one sampled entry's time in dense-product entries of this layer
                ratios.append(times[kinds.index("sampled")] / idx.numel() / (times[0] / (s[0] * s[1])))
        print(json.dumps({"shape": shape, "tokens": tokens, "rank": r, "dense_s": round(dense, 4),
                          "chosen_s": round(chosen, 4), "chosen_without_sampled_s": round(no_sampled, 4),
                          "fastest_per_layer_s": round(fastest, 4),
                          "chosen_vs_fastest": round(chosen / fastest, 3),
                          "sampled_entry_cost": {"median": round(statistics.median(ratios), 2),
                                                 "min": round(min(ratios), 2), "max": round(max(ratios), 2)}}),
              flush=True)
