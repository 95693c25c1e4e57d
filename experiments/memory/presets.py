"""The pre-flight memory estimate (``speft.memory``) for the study's LLM presets, offline: each model's
structure is rebuilt on the meta device from its published configuration (``speft.models.architectures``;
no download), then estimated as ``python run.py experiment=<preset> dry_run=true`` would on a GPU.

    python experiments/memory/presets.py   # writes experiments/memory/presets.json and prints a Markdown table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QLORA = ("model.quantization=nf4", "model.dtype=bfloat16")  # the QLoRA setting: an NF4 base computing in bf16
PRESETS = [("gsm8k_gemma2_2b", ()), ("gsm8k_gemma2_2b_lora", ()), ("mmlu_gemma2_2b", ()), ("gsm8k_qwen2_7b", ()),
           ("code_gemma2_2b", ()), ("code_llama3_8b_lora", ()), ("gsm8k_qwen2_7b", QLORA),
           ("gsm8k_qwen2_7b", ("model.dtype=bfloat16",)), ("code_llama3_8b_lora", QLORA),
           ("code_llama3_8b_pissa", ("model.dtype=bfloat16",))]
GPUS = [("RTX 4090 / A10 / L4 (24 GB)", 24), ("A6000 / L40S (48 GB)", 48), ("A100 / H100 (80 GB)", 80),
        ("H200 (141 GB)", 141)]


def estimate_preset(preset: str, overrides: tuple[str, ...] = ()) -> dict:
    from speft.config import validate
    from speft.memory import estimate
    from speft.models.architectures import meta_causal_lm
    from speft.pipeline import plan_budget
    from tests.conftest import compose_cfg

    extra = ["task.allow_code_execution=true"] if preset.startswith("code_") else []
    spec = validate(compose_cfg(f"experiment={preset}", *extra, *overrides))
    model = meta_causal_lm(spec.model.name)
    shapes, k = plan_budget(spec, model)  # pre-flight's own budget, on the published shapes
    est = estimate(model, spec, shapes, k, device="cuda", causal_lm=True).record()
    fits = next((gpu for gpu, gb in GPUS if est["peak"] / 1024 <= gb * 0.93), "none of these")  # ~7 % unusable
    return {"preset": preset, "overrides": list(overrides), "model": spec.model.name, "method": spec.method.name,
            "dtype": spec.model.dtype, "quantization": spec.model.quantization,
            "batch": spec.trainer.batch_size, "length": spec.task.max_length,
            "checkpointing": spec.trainer.gradient_checkpointing, "estimate_mb": est, "smallest_gpu": fits}


def main() -> None:
    rows = [estimate_preset(p, o) for p, o in PRESETS]
    (ROOT / "experiments" / "memory" / "presets.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| preset | model, dtype | batch × length | weights | trainable + AdamW | scores | activations | "
          "peak | smallest GPU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    g = lambda mb: f"{mb / 1024:.1f} GB"  # noqa: E731
    for r in rows:
        e = r["estimate_mb"]
        ckpt = " (ckpt)" if r["checkpointing"] else ""
        preset = " ".join([r["preset"], *r["overrides"]])
        base = r["dtype"] + ("" if r["quantization"] == "none" else f", {r['quantization']} base")
        print(f"| `{preset}` | {r['model']}, {base} | {r['batch']} × {r['length']}{ckpt} | "
              f"{g(e['weights'])} | {g(e['trainable'])} | {g(e['scores'])} | {g(e['activations'])} | "
              f"**{g(e['peak'])}** | {r['smallest_gpu']} |")


if __name__ == "__main__":
    main()
