"""Efficiency benchmark: step time and peak memory of sparse, LoRA, full and frozen training.

``python -m speft.bench`` trains a few steps of a causal LM of a given shape (random weights: only
the cost is measured) with each method in its own process, and prints one JSON line per method with
the median step time, peak memory (RSS on CPU, peak CUDA allocation on GPU), the trainable count and
the ratios to LoRA. ``sparse`` and ``lora`` train the same number of entries on the same target
modules (the density is given as ``lora:<r>``); ``frozen`` back-propagates through every layer
without weight gradients, the floor for any adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("sparse", "lora", "full", "frozen")

# Llama-family shapes (hidden, layers, heads, kv heads, intermediate, vocab).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, tie_word_embeddings=True),  # for tests
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m speft.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--targets", default="all_linear", help="target preset of the llama family")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank; sparse trains lora:<rank> entries")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--topk-scores", type=float, default=None,
                   help="instead: peak memory of selecting 1%% of this many scores (over 64 modules) with "
                        "speft's global top-k vs a concatenating torch.topk")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--topk-worker", choices=("speft", "concat"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if min(args.batch, args.seq, args.steps, args.rank) < 1 or args.warmup < 0:
        p.error("--batch, --seq, --steps and --rank must be >= 1, --warmup >= 0")
    return args


def build(args: argparse.Namespace, method: str):
    """The model with only ``method``'s parameters trainable; returns (model, trainable params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from speft.config import Budget
    from speft.masks.selection import select_global
    from speft.models.loading import find_targets, target_shapes
    from speft.sparse.layer import inject

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    targets = find_targets(model, "llama", args.targets, None)
    if method == "sparse":
        k = Budget("lora", args.rank).resolve(target_shapes(targets))
        scores = {n: torch.rand(m.weight.shape, device=args.device) for n, m in targets.items()}
        inject(model, select_global(scores, k))
        del scores
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        names = sorted({n.rsplit(".", 1)[-1] for n in targets})
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                                 target_modules=names))
    elif method == "frozen":
        model.enable_input_require_grads()  # backward through every layer, no weight gradient
    return model, [p for p in model.parameters() if p.requires_grad and (method != "frozen")]


def worker(args: argparse.Namespace) -> dict:
    method = args.worker
    model, params = build(args, method)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=args.device, generator=g)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "step_s": round(statistics.median(times), 4), "peak_memory_mb": round(peak, 1),
            "trainable": sum(p.numel() for p in params), "shape": args.shape, "batch": args.batch,
            "seq": args.seq, "targets": args.targets, "rank": args.rank, "device": args.device,
            "dtype": args.dtype, "threads": torch.get_num_threads()}


def topk_worker(args: argparse.Namespace) -> dict:
    """Select 1 % of ``--topk-scores`` scores spread over 64 modules; report time and peak RSS."""
    from speft.masks.selection import select_global

    n = int(args.topk_scores)
    g = torch.Generator().manual_seed(0)
    scores = {f"m{i}": torch.rand(n // 64, generator=g) for i in range(64)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    k = n // 100
    t0 = time.perf_counter()
    if args.topk_worker == "speft":
        selected = select_global(scores, k)
    else:
        flat = torch.cat([s.flatten() for s in scores.values()])
        selected = torch.topk(flat, k).indices
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del selected
    return {"selection": args.topk_worker, "scores": n, "k": k, "seconds": round(seconds, 2),
            "scores_mb": round(n * 4 / 2**20, 1), "extra_peak_mb": round(peak - base, 1)}


def _subprocess_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return []
    if args.topk_worker:
        print(json.dumps(topk_worker(args)), flush=True)
        return []
    if args.topk_scores:
        rows = [_subprocess_json([sys.executable, "-m", "speft.bench", f"--topk-scores={args.topk_scores}",
                                  f"--topk-worker={w}"]) for w in ("speft", "concat")]
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows
    skip = ("methods", "worker", "topk_scores", "topk_worker")
    common = [f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
    rows = []
    for method in args.methods.split(","):
        row = _subprocess_json([sys.executable, "-m", "speft.bench", *common, "--worker", method])
        rows.append({"method": method, **row})
    lora = next((r for r in rows if r.get("method") == "lora" and "error" not in r), None)
    for row in rows:
        if lora and "error" not in row:
            row["step_vs_lora"] = round(row["step_s"] / lora["step_s"], 3)
            row["memory_vs_lora"] = round(row["peak_memory_mb"] / lora["peak_memory_mb"], 3)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
