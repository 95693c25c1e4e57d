"""Efficiency benchmark: step time and peak memory of sparse, LoRA, full and frozen training.

``python -m speft.tools.bench`` trains a few steps of a model of a given shape with each method in its own
process and prints one JSON line per method, budget and mask with the median step time, peak memory
(RSS on CPU, peak CUDA allocation on GPU), the trainable count, the ratios to LoRA at the same rank
and to the frozen floor, and, for sparse, the structured fraction: the share of the dense weight
gradient's entries its backward computes (see :mod:`speft.sparse.layer`). ``sparse`` and ``lora``
train the same number of entries on the same target modules (the density is ``lora:<r>``, one row
per ``--rank``); ``frozen`` back-propagates through every layer without weight gradients, the floor
for any adapter; ``full`` trains every weight. Sparse rows also give the seconds of the step spent
forming the values' gradient (``values_grad_s``): what the mask's structure decides.

The sparse mask is ``--mask random`` (uniform scores: entries spread everywhere, the worst case) or
``--mask grad``: the global top-k of |mean gradient| scores of the real packaged model
(``smollm2-135m``: SmolLM2-135M on GSM8K training rows; ``minilm``: MiniLM-L6 on SST-2 sentences)
read from ``--data-dir`` (the config's ``paths.data_dir``); other shapes have no packaged weights, so
their scores come from the randomly initialised model of that shape on the same GSM8K text (UTF-8
bytes as tokens). Timing always uses random weights of the shape: cost does not depend on values.
``--repeats`` runs every configuration that many times, interleaved, and reports medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from speft.models.architectures import ARCHITECTURES
from speft.models.quantization import QUANTIZATIONS
from speft.utils import peak_rss_mb, process_peak_mb

METHODS = ("sparse", "lora", "full", "frozen")
MASKS = ("random", "grad")

# Llama-family shapes (hidden, layers, heads, kv heads, intermediate, vocab) and the default run's MiniLM.
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, tie_word_embeddings=True),  # for tests
    "smollm2-135m": ARCHITECTURES["smollm2_135m"][1],
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, num_labels=2),
}
# Per shape: family, default targets, batch, tokens per sequence (the default run: 32 snippets of
# about 60 tokens, attention projections; the causal LMs: 4 × 128 tokens on all linear layers),
# and the packaged model (conf/model/<name>.yaml) whose real scores make the grad mask.
DEFAULTS = {
    "minilm": ("bert", "attention", 32, 64, "minilm"),
    "smollm2-135m": ("llama", "all_linear", 4, 128, "smollm2_135m"),
}
LLAMA_DEFAULTS = ("llama", "all_linear", 4, 128, None)


def shape_defaults(shape: str) -> tuple[str, str, int, int, str | None]:
    return DEFAULTS.get(shape, LLAMA_DEFAULTS)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m speft.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: per shape)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: per shape)")
    p.add_argument("--targets", default=None, help="target preset of the family (default: per shape)")
    p.add_argument("--rank", type=_ints, default=[16], help="LoRA ranks, comma-separated; sparse trains lora:<r>")
    p.add_argument("--mask", default="random", help=f"sparse masks, comma-separated subset of {MASKS}")
    p.add_argument("--data-dir", default=os.environ.get("SPEFT_DATA_DIR", "../shared/data"),
                   help="real text for --mask grad (paths.data_dir: gsm8k/train.jsonl, glue/SST-2/train.tsv)")
    p.add_argument("--score-examples", type=int, default=32, help="examples the grad mask is scored on")
    p.add_argument("--masks-file", default=None,
                   help="grad masks are read from this file when it holds the same shape, targets, text and ranks; "
                        "else scored and written to it (saves rescoring between runs)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="processes per configuration, interleaved (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="the frozen linear layers in NF4 or int8 (bitsandbytes; LoRA becomes QLoRA)")
    p.add_argument("--table", default=None,
                   help="also write the rows as a Markdown table to this file (experiments/efficiency/)")
    p.add_argument("--topk-scores", type=float, default=None,
                   help="instead: peak memory of selecting 1%% of this many scores (over 64 modules) with "
                        "speft's global top-k vs a concatenating torch.topk")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--mask-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # the random model, saved to quantize
    p.add_argument("--topk-worker", choices=("speft", "concat"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    family, targets, batch, seq, _ = shape_defaults(args.shape)
    args.family = family
    args.targets = args.targets or targets
    args.batch = args.batch or batch
    args.seq = args.seq or seq
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    unknown = set(args.mask.split(",")) - set(MASKS)
    if unknown:
        p.error(f"unknown masks {sorted(unknown)}; choose from {', '.join(MASKS)}")
    if min(args.batch, args.seq, args.steps, args.repeats, args.score_examples, *args.rank) < 1 or args.warmup < 0:
        p.error("--batch, --seq, --steps, --repeats, --score-examples and --rank must be >= 1, --warmup >= 0")
    if args.quantization != "none" and "full" in ([args.worker] if args.worker else args.methods.split(",")):
        p.error(f"--quantization {args.quantization}: full fine-tuning trains the quantized weights; leave out full "
                f"(--methods sparse,lora,frozen)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    return args


def random_model(args: argparse.Namespace):
    """A randomly initialised model of ``args.shape`` in ``args.dtype`` on ``args.device``; with ``--quantization``,
    the same model (saved once by the parent as ``--checkpoint``) loaded through transformers' bitsandbytes
    quantization, as a run loads its base."""
    if args.checkpoint:
        from speft.models.families import FAMILIES
        from speft.models.loading import auto_class
        from speft.models.quantization import bnb_config

        dtype = getattr(torch, args.dtype)
        quantization = bnb_config(args.quantization, dtype, FAMILIES[args.family].head)
        head = "seq_cls" if args.family == "bert" else "causal_lm"
        device_map = {"": args.device} if args.device != "cpu" else None
        return auto_class(head).from_pretrained(args.checkpoint, dtype=dtype, quantization_config=quantization,
                                                device_map=device_map)
    cfg = dict(SHAPES[args.shape])
    if args.family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config, cls = BertConfig(**cfg, max_position_embeddings=max(512, args.seq)), BertForSequenceClassification
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config, cls = LlamaConfig(**cfg, max_position_embeddings=max(2048, args.seq)), LlamaForCausalLM
    with torch.device(args.device):
        return cls(config).to(getattr(torch, args.dtype))


def target_layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each default target module of a bench shape, from its model built on the meta device
    (no memory, no initialisation): what the stored grad masks of that shape index."""
    from speft.models.loading import find_targets, target_shapes

    args = parse_args([f"--shape={shape}", "--device=cpu"])
    args.device = "meta"
    return target_shapes(find_targets(random_model(args), args.family, args.targets, None))


def batch_inputs(args: argparse.Namespace, ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    if args.family == "bert":
        if labels is None:
            labels = torch.arange(ids.shape[0], device=ids.device) % SHAPES[args.shape]["num_labels"]
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids if labels is None else labels}


def _model_config(name: str):
    import yaml

    from speft.config import ModelConfig

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "model" / f"{name}.yaml").read_text())
    raw.pop("defaults", None)
    return ModelConfig(**raw)


def _read_text(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(text, label) pairs of real data: SST-2 sentences for MiniLM, GSM8K rows for the causal LMs."""
    root = Path(args.data_dir)
    n = args.score_examples
    if args.family == "bert":
        path = root / "glue" / "SST-2" / "train.tsv"
        if not path.exists():
            raise SystemExit(f"--mask grad needs {path} (set --data-dir or SPEFT_DATA_DIR)")
        lines = path.read_text(encoding="utf-8").splitlines()[1:n + 1]
        return [(t.strip(), int(label)) for t, label in (line.rsplit("\t", 1) for line in lines)]
    path = root / "gsm8k" / "train.jsonl"
    if not path.exists():
        raise SystemExit(f"--mask grad needs {path} (set --data-dir or SPEFT_DATA_DIR)")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [(f"Question: {r['question']}\nAnswer: {r['answer']}", 0) for r in rows]


def scoring_setup(args: argparse.Namespace):
    """(model, batches) for the grad mask: the packaged model and its tokenizer where the shape has one,
    else the random model of the shape with UTF-8 bytes as tokens. Batches hold ``args.batch`` examples."""
    pairs = _read_text(args)
    package = shape_defaults(args.shape)[4]
    if package:
        from speft.models.loading import load_model, load_tokenizer

        cfg = _model_config(package)
        head = "seq_cls" if args.family == "bert" else "causal_lm"
        model = load_model(cfg, head, 2 if args.family == "bert" else None).to(args.device, getattr(torch, args.dtype))
        tok = load_tokenizer(cfg)
        enc = tok([t for t, _ in pairs], truncation=True, max_length=args.seq, padding="max_length",
                  return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"]
    else:
        model = random_model(args)
        vocab = SHAPES[args.shape]["vocab_size"]
        ids = torch.zeros(len(pairs), args.seq, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (t, _) in enumerate(pairs):
            b = torch.tensor(list(t.encode("utf-8")[:args.seq]), dtype=torch.long) % vocab
            ids[i, :b.numel()], attn[i, :b.numel()] = b, 1
    labels = torch.tensor([label for _, label in pairs])
    batches = []
    for s in range(0, len(pairs), args.batch):
        i, a = ids[s:s + args.batch].to(args.device), attn[s:s + args.batch].to(args.device)
        y = labels[s:s + args.batch].to(args.device) if args.family == "bert" else i.masked_fill(a == 0, -100)
        batches.append({**batch_inputs(args, i, y), "attention_mask": a})
    return model, batches


def grad_masks(args: argparse.Namespace) -> dict[int, dict[str, torch.Tensor]]:
    """Per rank: the global top-k (k = lora:<r>) of |mean gradient| over the scoring examples."""
    from speft.config import Budget
    from speft.masks.selection import select_global
    from speft.models.loading import find_targets, target_shapes
    from speft.salience.base import ScoreContext, mean_gradient

    torch.manual_seed(0)
    model, batches = scoring_setup(args)
    targets = find_targets(model, args.family, args.targets, None)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    scores = mean_gradient(ScoreContext(model, targets, lambda: iter(batches), n, 0))
    scores = {name: s.abs_() for name, s in scores.items()}
    shapes = target_shapes(targets)
    return {r: {name: i.cpu() for name, i in select_global(scores, Budget("lora", r).resolve(shapes)).items()}
            for r in args.rank}


def cached_grad_masks(args: argparse.Namespace) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`grad_masks`, through ``--masks-file`` when given."""
    key = {"shape": args.shape, "targets": args.targets, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "score_examples": args.score_examples, "data_dir": str(Path(args.data_dir).resolve())}
    path = Path(args.masks_file) if args.masks_file else None
    if path and path.exists():
        saved = torch.load(path)
        if saved["key"] == key and set(args.rank) <= set(saved["masks"]):
            return {r: saved["masks"][r] for r in args.rank}
    masks = grad_masks(args)
    if path:
        torch.save({"key": key, "masks": masks}, path)
    return masks


def build(args: argparse.Namespace, method: str):
    """The model with only ``method``'s parameters trainable; returns (model, trainable params)."""
    from speft.config import Budget
    from speft.masks.selection import select_global
    from speft.models.loading import find_targets, target_shapes
    from speft.models.quantization import weight_shape
    from speft.sparse.layer import inject

    torch.manual_seed(0)
    model = random_model(args)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    targets = find_targets(model, args.family, args.targets, None)
    rank = args.rank[0]
    if method == "sparse":
        if args.mask_file:
            indices = torch.load(args.mask_file)
        else:
            k = Budget("lora", rank).resolve(target_shapes(targets))
            scores = {n: torch.rand(weight_shape(m), device=args.device) for n, m in targets.items()}
            indices = select_global(scores, k)
            del scores
        inject(model, {n: indices[n].to(args.device) for n in targets})
    elif method == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.quantization != "none":  # QLoRA, as method=lora on a quantized base
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules=sorted(targets)))
    elif method == "frozen":
        model.enable_input_require_grads()  # backward through every layer, no weight gradient
    if args.family == "bert" and method != "full":  # the classifier is new: trained by every method but frozen
        for p in model.get_submodule("base_model.model.classifier" if method == "lora" else "classifier").parameters():
            p.requires_grad_(method != "frozen")
    return model, [p for p in model.parameters() if p.requires_grad and (method != "frozen")]


def structure(model) -> dict:
    """The sparse layers' backward plans: the computed share of the dense weight gradient, and counts."""
    from speft.sparse.layer import sparse_layers

    plans = [layer.plan for layer in sparse_layers(model).values()]
    kinds: dict[str, int] = {}
    for p in plans:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {"structured_fraction": round(sum(p.computed for p in plans) / sum(p.dense for p in plans), 4),
            "plans": dict(sorted(kinds.items()))}


class ValuesGradTimer:
    """Seconds spent forming the sparse values' gradient (GradPlan.values_grad) in this process: the
    part of a sparse step above the frozen floor that the mask's structure decides. On CUDA each call
    is bracketed by events, not synchronisations, so the step stays asynchronous."""

    def __init__(self, device: str) -> None:
        from speft.sparse.layer import GradPlan

        self.cuda, self.spans, self.inner = device == "cuda", [], GradPlan.values_grad
        GradPlan.values_grad = functools.partialmethod(_timed_values_grad, self)

    def take(self) -> float:
        """The seconds timed since the last call (on CUDA: call it after synchronising)."""
        spans, self.spans = self.spans, []
        return sum(s.elapsed_time(e) / 1000 for s, e in spans) if self.cuda else sum(spans)


def _timed_values_grad(plan, timer, g2, x2):
    """``GradPlan.values_grad`` timed into ``timer.spans`` (CUDA: events around it, no synchronisation)."""
    if timer.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = timer.inner(plan, g2, x2)
        end.record()
        timer.spans.append((start, end))
    else:
        t = time.perf_counter()
        out = timer.inner(plan, g2, x2)
        timer.spans.append(time.perf_counter() - t)
    return out


def worker(args: argparse.Namespace) -> dict:
    method = args.worker
    model, params = build(args, method)
    model.train()
    timer = ValuesGradTimer(args.device) if method == "sparse" else None
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=args.device, generator=g)
    inputs = batch_inputs(args, ids)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, wgrad = [], []
    for step in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        if timer:
            timer.take()  # from this step on
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            wgrad.append(timer.take() if timer else 0.0)
    peak = process_peak_mb(cuda=args.device == "cuda")["cuda_allocated" if args.device == "cuda" else "rss"]
    row = {"method": method, "step_s": round(statistics.median(times), 4), "peak_memory_mb": round(peak, 1),
           "trainable": sum(p.numel() for p in params), "shape": args.shape, "batch": args.batch,
           "seq": args.seq, "targets": args.targets, "device": args.device, "dtype": args.dtype,
           "threads": torch.get_num_threads(), "quantization": args.quantization}
    if method in ("sparse", "lora"):
        row["rank"] = args.rank[0]
    if method == "sparse":
        row.update(mask="grad" if args.mask_file else "random", values_grad_s=round(statistics.median(wgrad), 4),
                   **structure(model))
    return row


def topk_worker(args: argparse.Namespace) -> dict:
    """Select 1 % of ``--topk-scores`` scores spread over 64 modules; report time and peak RSS."""
    from speft.masks.selection import select_global

    n = int(args.topk_scores)
    g = torch.Generator().manual_seed(0)
    scores = {f"m{i}": torch.rand(n // 64, generator=g) for i in range(64)}
    base = peak_rss_mb()
    k = n // 100
    t0 = time.perf_counter()
    if args.topk_worker == "speft":
        selected = select_global(scores, k)
    else:
        flat = torch.cat([s.flatten() for s in scores.values()])
        selected = torch.topk(flat, k).indices
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    del selected
    return {"selection": args.topk_worker, "scores": n, "k": k, "seconds": round(seconds, 2),
            "scores_mb": round(n * 4 / 2**20, 1), "extra_peak_mb": round(peak - base, 1)}


def _subprocess_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configurations(args: argparse.Namespace) -> list[tuple[str, int, str | None]]:
    """(method, rank, mask) to measure: full and frozen once, LoRA per rank, sparse per rank and mask."""
    methods = args.methods.split(",")
    out = [(m, args.rank[0], None) for m in ("full", "frozen") if m in methods]
    for r in args.rank:
        if "lora" in methods:
            out.append(("lora", r, None))
        if "sparse" in methods:
            out.extend(("sparse", r, mask) for mask in args.mask.split(","))
    return out


def summarise(runs: list[dict]) -> dict:
    """The median step time and peak memory over repeated processes of one configuration."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = dict(ok[-1])
    row["step_s"] = round(statistics.median(r["step_s"] for r in ok), 4)
    row["peak_memory_mb"] = round(statistics.median(r["peak_memory_mb"] for r in ok), 1)
    if "values_grad_s" in row:
        row["values_grad_s"] = round(statistics.median(r["values_grad_s"] for r in ok), 4)
    row["repeats"] = len(ok)
    return row


TABLE_COLUMNS = {"method": "method", "rank": "rank", "mask": "mask", "step_s": "step s", "step_vs_lora": "× LoRA",
                 "step_vs_frozen": "× frozen", "values_grad_s": "values' grad s", "peak_memory_mb": "peak MB",
                 "memory_vs_lora": "mem × LoRA", "structured_fraction": "structured fraction", "plans": "plans"}


def markdown_table(rows: list[dict]) -> str:
    """The rows as the Markdown table of experiments/efficiency/ (the report's one table writer): one line per
    method, rank and mask; a failed configuration says its error after its key."""
    from speft.report.tables import markdown_table as write_table

    keys = list(TABLE_COLUMNS)
    body = [[cell(row, k) for k in keys[:3]] + [f"error: {row['error']}"] + [""] * (len(keys) - 4) if "error" in row
            else [cell(row, k) for k in keys] for row in rows]
    table = write_table(list(TABLE_COLUMNS.values()), body, [k not in ("method", "mask", "plans") for k in keys])
    first = next((r for r in rows if "error" not in r), {})
    setting = ", ".join(f"{k} {first[k]}" for k in ("shape", "batch", "seq", "targets", "device", "dtype",
                                                    "quantization", "threads") if k in first)
    return f"{setting}; median of {first.get('repeats', 1)} processes per row\n\n" + table


def cell(row: dict, key: str) -> str:
    v = row.get(key)
    if key == "plans" and v:
        return ", ".join(f"{k} {n}" for k, n in v.items())
    return "" if v is None else str(v)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return []
    if args.topk_worker:
        print(json.dumps(topk_worker(args)), flush=True)
        return []
    if args.topk_scores:
        rows = [_subprocess_json([sys.executable, "-m", "speft.tools.bench", f"--topk-scores={args.topk_scores}",
                                  f"--topk-worker={w}"]) for w in ("speft", "concat")]
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows
    common = [f"--shape={args.shape}", f"--batch={args.batch}", f"--seq={args.seq}", f"--targets={args.targets}",
              f"--steps={args.steps}", f"--warmup={args.warmup}", f"--device={args.device}", f"--dtype={args.dtype}",
              f"--quantization={args.quantization}"]
    configs = configurations(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quantization != "none":  # the random model once, for each worker to load quantized
            torch.manual_seed(0)
            random_model(args).save_pretrained(os.path.join(tmp, "model"))
            common.append(f"--checkpoint={os.path.join(tmp, 'model')}")
        mask_files = {}
        if any(c[2] == "grad" for c in configs):
            for r, indices in cached_grad_masks(args).items():
                mask_files[r] = os.path.join(tmp, f"grad_r{r}.pt")
                torch.save(indices, mask_files[r])
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # interleaved: load changes hit every configuration alike
            for method, rank, mask in configs:
                extra = [f"--mask-file={mask_files[rank]}"] if mask == "grad" else []
                run = _subprocess_json(
                    [sys.executable, "-m", "speft.tools.bench", *common, f"--rank={rank}", *extra, "--worker", method])
                runs[(method, rank, mask)].append(run)
                print(json.dumps({"run": method, "rank": rank, "mask": mask, **run}), file=sys.stderr, flush=True)
    rows = [{"method": c[0], **summarise(runs[c])} for c in configs]
    frozen = next((r for r in rows if r["method"] == "frozen" and "error" not in r), None)
    for row in rows:
        lora = next((r for r in rows if r["method"] == "lora" and r.get("rank") == row.get("rank", -1)
                     and "error" not in r), None)
        if "error" not in row:
            if lora:
                row["step_vs_lora"] = round(row["step_s"] / lora["step_s"], 3)
                row["memory_vs_lora"] = round(row["peak_memory_mb"] / lora["peak_memory_mb"], 3)
            if frozen:
                row["step_vs_frozen"] = round(row["step_s"] / frozen["step_s"], 3)
        print(json.dumps(row), flush=True)
    if args.table:
        Path(args.table).write_text(markdown_table(rows), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
