"""A run's peak memory per process, estimated at pre-flight from the meta-device model and the config,
before any weight is loaded: frozen weights, trainable values with their gradients and AdamW state, the
salience score buffers, and the activations of one micro-batch (training) or one scoring batch.

    peak = runtime + weights + max(loading, scoring, training)

* ``weights``: every parameter in ``model.dtype`` (a GGUF checkpoint is de-quantised to it), or with
  ``model.quantization`` the linear layers outside the head in NF4 (0.53 bytes per weight) or int8 (1 byte);
* ``loading`` (host runs): one more copy of the weights while the checkpoint is read (a state dict beside the
  model); on a GPU the weights load shard by shard straight into the model (``device_map``), counted as none;
* ``scoring`` (methods with salience): one fp32 buffer per target weight (``sample_factor``-fold for metrics
  that keep two, as GraSP), plus the activations of a scoring batch; ``metric.offload`` moves the buffers to
  host memory (then they count for the host, not the device);
* ``training``: the trainable entries in fp32 (values, sparse indices), their gradients and AdamW's two
  moments, plus the activations of one micro-batch (``trainer.batch_size`` divided over the processes) at
  ``task.max_length`` tokens: per layer the stored inputs of every linear layer, the attention scores and
  probabilities (``heads × length²``), normalisation and MLP intermediates; with gradient checkpointing
  only each layer's input plus one layer's full set; a causal LM adds its logits (fp32, kept for the loss);
* ``runtime``: the interpreter, libraries, tokenizer and data (host; the LoRA family's ``peft`` import adds
  :data:`PEFT_IMPORT_MB`), or the CUDA context (device).

It is an estimate of the allocations a run makes, not of an allocator's caching or fragmentation: checked
against measured peaks on the CPU models in ``tests/test_memory.py`` (within :data:`TOLERANCE`), and
printed by ``python run.py ... dry_run=true`` without loading weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from speft.models.loading import is_head
from speft.models.quantization import bytes_per_weight

MB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOLERANCE = 0.3  # measured peaks lie within ±30 % of the estimate (tests/test_memory.py)
# Resident before the model: the interpreter, torch, transformers and speft, the tokenizer and the data (measured
# here: a run's peak minus its estimated allocations, MiniLM and SmolLM2); on a GPU, the CUDA context.
RUNTIME_MB = {"cpu": 740, "cuda": 500}
PEFT_IMPORT_MB = 170  # the LoRA family imports peft (and accelerate): host memory, measured here
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process, by component; ``peak_mb`` is what the process needs at its highest point."""

    device: str
    runtime: int
    weights: int
    loading: int
    trainable: int  # values (+ indices), gradients and optimizer state
    scores: int  # salience buffers
    score_activations: int
    activations: int  # one training micro-batch, logits included

    @property
    def peak(self) -> int:
        scoring = self.scores + self.score_activations
        training = self.trainable + self.activations
        return self.runtime + self.weights + max(self.loading, scoring, training)

    def record(self) -> dict:
        out = {k: round(v / MB, 1) for k, v in asdict(self).items() if k != "device"}
        return {"device": self.device, **out, "peak": round(self.peak / MB, 1)}

    def lines(self) -> list[str]:
        r = self.record()
        return [f"memory estimate per process ({self.device}): peak {fmt(r['peak'])}",
                f"  weights {fmt(r['weights'])}, loading +{fmt(r['loading'])}, trainable+grads+AdamW "
                f"{fmt(r['trainable'])}, scores {fmt(r['scores'])} + {fmt(r['score_activations'])} activations, "
                f"training activations {fmt(r['activations'])}, runtime {fmt(r['runtime'])}"]


def fmt(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


@dataclass(frozen=True)
class Shape:
    """What the activation estimate needs from a transformer's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    gated: bool  # a gated MLP (Llama, Gemma, Qwen): gate and up projections

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        c = getattr(model.config, "text_config", None) or model.config
        hidden = _first(c, "hidden_size", "d_model", "n_embd")
        return cls(layers=_first(c, "num_hidden_layers", "n_layer", "num_layers"), hidden=hidden,
                   intermediate=_first(c, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
                   heads=_first(c, "num_attention_heads", "n_head"), vocab=_first(c, "vocab_size"),
                   gated=hasattr(c, "hidden_act") and any(k in type(c).__name__ for k in ("Llama", "Gemma", "Qwen",
                                                                                          "Mistral")))


def _first(config, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    if default is None:
        raise ValueError(f"the model config has none of {', '.join(names)}")
    return default


def activation_bytes(shape: Shape, batch: int, length: int, dtype_bytes: int, checkpointing: bool,
                     causal_lm: bool) -> int:
    """Activations a forward keeps for its backward over ``batch`` sequences of ``length`` tokens."""
    h, i, a, tokens = shape.hidden, shape.intermediate, shape.heads, batch * length
    # per token: q/k/v/o inputs and outputs, two norms, residuals (~10 h); MLP input, intermediates, output
    per_token = 10 * h + (3 if shape.gated else 2) * i
    per_layer = dtype_bytes * (tokens * per_token + 2 * a * batch * length * length)  # + scores, probabilities
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        stored = shape.layers * dtype_bytes * tokens * h + per_layer
    else:
        stored = shape.layers * per_layer
    # the backward of a layer holds the gradients of its activations beside them: one layer's worth more
    return stored + per_layer + (2 * 4 * tokens * shape.vocab if causal_lm else 0)  # fp32 logits and their gradient


def weight_bytes(model: nn.Module, cfg, dtype_bytes: int, peft: bool = False) -> int:
    """Every parameter in ``model.dtype``; with ``model.quantization``, the linear layers outside the head in 4 or 8
    bits (:func:`speft.models.quantization.bytes_per_weight`), and for the LoRA family (``peft``) every other
    parameter in fp32, as PEFT's k-bit preparation casts them."""
    if cfg.quantization == "none":
        return sum(p.numel() for p in model.parameters()) * dtype_bytes
    quantized = {id(m.weight): m for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not is_head(name, cfg.family)}
    rest = 4 if peft else dtype_bytes
    return round(sum(p.numel() * (bytes_per_weight(cfg.quantization, dtype_bytes, quantized[id(p)].in_features)
                                  if id(p) in quantized else rest) for p in model.parameters()))


def loading_bytes(model: nn.Module, cfg, dtype_bytes: int, weights: int, device: str) -> int:
    """Host runs hold a second copy of the weights while the checkpoint is read; a quantized base is quantized
    from the full-precision checkpoint, all of whose pages are read. None on a GPU (shard by shard)."""
    if device != "cpu":
        return 0
    return weights if cfg.quantization == "none" else sum(p.numel() for p in model.parameters()) * dtype_bytes


def trainable_bytes(method: str, budget: int | None, params: int, head: int) -> int:
    """What training adds to the weights: fp32 gradients and AdamW's two moments of every trained entry, and
    the values themselves where they are separate from the weights (sparse values + int32 indices, adapters)."""
    state = 4 * (1 + ADAM_STATES)
    if method == "full":
        return params * state
    entries = budget or 0
    own = 4 * entries + (4 * entries if method == "sparse" else 0)
    return (entries + head) * state + own


def estimate(model: nn.Module, spec, targets: dict[str, tuple[int, int]], budget: int | None, *, device: str,
             world_size: int = 1, causal_lm: bool = False, head_params: int = 0) -> MemoryEstimate:
    """The estimate for ``spec`` (a validated config) on the meta-device ``model`` with ``targets``' shapes."""
    from speft import registry

    dtype_bytes = DTYPE_BYTES[spec.model.dtype]
    params = sum(p.numel() for p in model.parameters())
    shape = Shape.of(model)
    length, tcfg = spec.task.max_length, spec.trainer
    checkpointing = tcfg.gradient_checkpointing
    per_process = lambda n: max(1, -(-n // world_size))  # noqa: E731 - a micro-batch divided over the processes
    train_acts = activation_bytes(shape, per_process(tcfg.batch_size), length, dtype_bytes, checkpointing, causal_lm)
    scores = score_acts = 0
    method = registry.get("method", spec.method.name).obj
    weights = weight_bytes(model, spec.model, dtype_bytes, peft=method.uses_peft)
    if method.uses_salience:
        metric = registry.get("metric", spec.metric.name).obj
        factor = metric.sample_factor  # GraSP keeps two halves
        target_entries = sum(o * i for o, i in targets.values())
        scores = 0 if spec.metric.offload and device != "cpu" else 4 * target_entries * factor
        sbatch = per_process(spec.metric.batch_size or tcfg.batch_size)
        score_acts = activation_bytes(shape, sbatch, length, dtype_bytes, checkpointing, causal_lm)
    host = RUNTIME_MB["cpu"] + (PEFT_IMPORT_MB if method.uses_peft else 0)
    runtime = RUNTIME_MB["cuda"] if device == "cuda" else host
    return MemoryEstimate(device=device, runtime=runtime * MB,
                          weights=weights, loading=loading_bytes(model, spec.model, dtype_bytes, weights, device),
                          trainable=trainable_bytes(spec.method.name, budget, params, head_params),
                          scores=scores, score_activations=score_acts, activations=train_acts)
