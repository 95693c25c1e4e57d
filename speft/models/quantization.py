"""A quantized frozen base (``model.quantization``): bitsandbytes NF4 or int8 linear layers, as QLoRA.

The checkpoint is quantized while it loads (transformers' ``BitsAndBytesConfig``: shard by shard, so a 7B
model never sits in memory unquantized); every linear layer but the task head and the output embedding
becomes a ``bnb.nn.Linear4bit`` (NF4, double-quantized absmax, computing in ``model.dtype``) or a
``bnb.nn.Linear8bitLt``. Embeddings, norms and the head keep ``model.dtype``. bitsandbytes 0.50 runs both
forward and backward on CPU, so everything here is tested without a GPU.

What trains on it: the sparse delta stays unmerged beside the quantized weight
(:class:`speft.sparse.layer.SparseDeltaLinear`), salience gradients come from each layer's input and
output gradient (:func:`speft.salience.base.target_gradients`), and the LoRA family goes through PEFT's
k-bit preparation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from speft.registry import ConfigError

QUANTIZATIONS = ("none", "nf4", "int8")
PACKED = ("Params4bit", "Int8Params")  # bitsandbytes' quantized weight types
BNB_PIN = "bitsandbytes==0.50.2"
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit blocksize)
DOUBLE_QUANT_BLOCK = 256  # absmax per second-level fp32 constant (double quantization: absmax in 8 bits)


def require_bitsandbytes(quantization: str) -> None:
    """Pre-flight: a quantized base needs bitsandbytes (checked without importing it)."""
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={quantization} needs bitsandbytes, which is not installed: "
                          f"pip install {BNB_PIN} (or pip install -e '.[quant]'), or set model.quantization=none")


def bnb_config(quantization: str, dtype: torch.dtype, skip: tuple[str, ...]):
    """transformers' quantization config for ``quantization`` (None for "none"); ``skip``: modules kept unquantized
    (the task head, the output embedding)."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":  # QLoRA's recipe: NF4, double-quantized constants, compute in the model's dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(skip))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes linear layer (its weight packed: 4-bit or int8 with per-row scales)."""
    return type(getattr(module, "weight", None)).__name__ in PACKED


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, quantized or not (a packed 4-bit weight's own shape is (n/2, 1))."""
    return module.out_features, module.in_features


def weight_numel(module: nn.Module) -> int:
    out_f, in_f = weight_shape(module)
    return out_f * in_f


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense (out, in) tensor: de-quantized (in the compute dtype) for a bitsandbytes
    layer, else the weight itself."""
    if not is_quantized(module):
        return module.weight
    from peft.utils.integrations import dequantize_module_weight

    weight = module.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for its bf16 CPU kernel at the first no-grad eval forward (CPUs with
        # AVX512-BF16); de-quantizing needs the standard layout back, as its own state-dict saving does
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    w = dequantize_module_weight(module)
    dtype = getattr(module, "compute_dtype", None) or w.dtype
    return w.to(dtype)


@torch.no_grad()
def release_checkpoint(model: nn.Module) -> None:
    """On the host: copy the parameters left in float (embeddings, norms, head) out of the checkpoint's memory map.
    transformers maps the safetensors file and quantizes from it, touching every page; as long as one loaded tensor
    still views the map, all those pages stay resident (on SmolLM2-135M: 520 MB beside a 160 MB model)."""
    for p in model.parameters():
        if type(p).__name__ not in PACKED:  # the quantized layers' biases too
            p.data = p.data.clone()


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def plain_linear(base: nn.Module, delta: nn.Module | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the de-quantized weight of ``base`` (plus α·Δ of a sparse layer ``delta``) and its
    bias, in the compute dtype (bitsandbytes de-quantizes in fp32 here; transformers' ``dequantize`` goes through
    bf16)."""
    w = dense_weight(base).clone()
    if delta is not None:
        w.view(-1)[delta.indices.long()] += (delta.scaling * delta.values.detach()).to(w.dtype)
    bias = base.bias
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    out.weight.copy_(w)
    if bias is not None:
        out.bias.copy_(bias)
    return out.requires_grad_(False)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, config) -> nn.Module:
    """``linear`` as a bitsandbytes layer of transformers' ``BitsAndBytesConfig`` ``config`` (the one the model was
    loaded with: NF4 or int8, double quantization, compute dtype), on ``linear``'s device (bitsandbytes quantizes
    when the weight moves there)."""
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if config.load_in_4bit:
        dtype, double = config.bnb_4bit_compute_dtype, config.bnb_4bit_use_double_quant
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                              compress_statistics=double, quant_type=config.bnb_4bit_quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, compress_statistics=double,
                                     quant_type=config.bnb_4bit_quant_type, module=q)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=config.llm_int8_threshold, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(linear.weight.device)


@contextmanager
def float_weights(model: nn.Module, targets: dict[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    """Inside: every quantized linear layer of ``model`` is a plain ``nn.Linear`` holding its de-quantized weight
    (a sparse layer on a quantized base: W0 + α·Δ), for the metrics that need float weights (SynFlow replaces them
    by their absolute values, GraSP differentiates them twice). Yields ``targets`` as the swapped modules; the
    quantized ones are put back after. Costs the float model's memory while inside."""
    from speft.sparse.layer import SparseDeltaLinear

    swapped: dict[str, nn.Module] = {}
    for name, m in list(model.named_modules()):
        if any(name.startswith(done + ".") for done in swapped):
            continue  # the quantized base inside a swapped sparse layer
        if isinstance(m, SparseDeltaLinear) and m.quantized:
            swapped[name] = m
            replace_module(model, name, plain_linear(m.base, m))
        elif is_quantized(m):
            swapped[name] = m
            replace_module(model, name, plain_linear(m))
    try:
        yield {n: model.get_submodule(n) if n in swapped else m for n, m in targets.items()}
    finally:
        for name, m in swapped.items():
            replace_module(model, name, m)


def quantized_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_quantized(m)]


def check_quantized(model: nn.Module, quantization: str, source: str) -> None:
    """After loading: a quantized base must have quantized linear layers (a model without any is refused)."""
    if quantization != "none" and not quantized_layers(model):
        raise ConfigError(f"model.quantization={quantization}: {source} has no linear layer to quantize "
                          f"(set model.quantization=none)")


def bytes_per_weight(quantization: str, dtype_bytes: int, in_features: int) -> float:
    """Memory per entry of a quantized linear weight: NF4 packs two per byte plus one 8-bit absmax per block of
    :data:`NF4_BLOCK` (and an fp32 per :data:`DOUBLE_QUANT_BLOCK` of those); int8 one byte plus an fp32 scale
    per row."""
    if quantization == "nf4":
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
    if quantization == "int8":
        return 1 + 4 / in_features
    return dtype_bytes
