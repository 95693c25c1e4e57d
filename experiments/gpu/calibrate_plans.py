"""The backward plans' cost constants measured on a device (``PlanCosts`` in ``speft/sparse/layer.py``).

    python experiments/gpu/calibrate_plans.py --device cuda [--dtype bfloat16] [--quick]

Prints one JSON line: the device, the measured timings and ``costs`` in units of one dense-product entry:

* ``block``: the fixed cost of one block product (a tiny 8 × 8 product's time, less its 64 entries);
* ``gather``: one gathered feature column (``index_select`` of half of the columns of X, per column);
* ``sampled``: one entry of the sampled product (``torch.sparse.sampled_addmm`` at 5 % of the entries, about a
  LoRA-r16 budget), less its gathers and call, or null where the device has no kernel for it.

Micro-kernels are not the plans themselves: on this CPU (576 wide, 512 tokens, one thread) they give gather ~40,
block ~1,500 and sampled ~12 against the constants validated on real masks (16, 512, 6), i.e. within 2-3x and on
the side that makes structured plans look dearer. Before committing a device's costs, check the plans they pick
against per-plan timings (``experiments/efficiency/plan_costs.py``). To use them, add
``"<device type>": <costs>`` to ``speft/sparse/plan_costs.json`` and commit it: the layer then plans structured
backward products on that device type (without it, one dense product there). The GPU check
(``experiments/gpu/check.sh``) runs this as its ``plans`` step, at 2048 wide (a 1B model's hidden size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from speft.sparse.layer import _sampled


def timer(device: torch.device, repeats: int):
    def measure(fn) -> float:
        fn()  # warm-up: kernels chosen, memory allocated
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return measure


def calibrate(device: torch.device, dtype: torch.dtype, tokens: int, features: int, repeats: int) -> dict:
    measure = timer(device, repeats)
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = torch.randn(tokens, features, generator=g).to(device, dtype)
    x = torch.randn(tokens, features, generator=g).to(device, dtype)
    dense_s = measure(lambda: grad.t().mm(x))
    unit = dense_s / features**2  # seconds per dense-product entry
    block_s = measure(lambda: x[:, :8].t().mm(grad[:, :8]))
    cols = torch.sort(torch.randperm(features, generator=g)[: features // 2]).values.to(device)
    gather_s = measure(lambda: x.index_select(1, cols))
    nnz = max(1, features**2 // 20)
    flat = torch.sort(torch.randperm(features**2, generator=g)[:nnz]).values
    rows, col = flat // features, flat % features
    crow = torch.zeros(features + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=features), 0)
    csr = (crow.to(device), col.to(device))
    gather = gather_s / (features // 2) / unit
    block = max(block_s / unit - 64, 0.0)
    try:
        sampled_s = measure(lambda: _sampled(csr, grad, x))
        sampled = round(max(sampled_s / unit - gather * 2 * features - block, 0.0) / nnz, 2)
    except (RuntimeError, NotImplementedError):  # no sampled_addmm kernel for this device or dtype
        sampled_s = sampled = None
    costs = {"gather": round(gather, 1), "block": round(block, 1), "sampled": sampled}
    return {"device": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "features": features,
            "seconds": {"dense": dense_s, "block_8x8": block_s, "gather_half": gather_s, "sampled_5pct": sampled_s},
            "costs": costs}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--features", type=int, default=2048,
                   help="layer width (the model's hidden size: the products the plans replace are this wide)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch")
    p.add_argument("--quick", action="store_true", help="small shapes, one repeat (tests)")
    args = p.parse_args(argv)
    tokens, features, repeats = (64, 256, 1) if args.quick else (args.tokens, args.features, 5)
    row = calibrate(torch.device(args.device), getattr(torch, args.dtype), tokens, features, repeats)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
