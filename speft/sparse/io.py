"""Save, load, merge and unload sparse adapters.

An adapter is a folder with ``adapter.safetensors`` (per module: ``<module>.indices`` int32 and
``<module>.values`` fp32, 8 bytes per trainable entry) and ``adapter_config.json`` (base model, target
modules and their shapes, scaling, metric, density, speft version).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import speft
from speft.models.loading import dequantised
from speft.models.quantization import plain_linear, quantized_layers, replace_module, weight_shape
from speft.sparse.layer import SparseDeltaLinear, inject, sparse_layers

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(model: nn.Module, folder: str | Path, **info) -> Path:
    """Write the model's sparse layers to ``folder``; ``info`` (base model, metric, ...) goes to the config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no sparse layers to save")
    tensors = {}
    for name, layer in layers.items():
        indices, values = layer.export()
        tensors[f"{name}.indices"] = indices.to(torch.int32).contiguous().cpu()
        tensors[f"{name}.values"] = values.contiguous().cpu()
    scalings = {layer.scaling for layer in layers.values()}
    config = {
        "format": "speft-sparse-delta",
        "speft_version": speft.__version__,
        "scaling": scalings.pop() if len(scalings) == 1 else {n: m.scaling for n, m in layers.items()},
        "modules": {n: list(m.shape) for n, m in layers.items()},
        "entries": sum(t.numel() for n, t in tensors.items() if n.endswith(".values")),
        **info,
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "speft-sparse-delta"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> dict[str, SparseDeltaLinear]:
    """Inject the saved sparse layers into a fresh base model (weights as pretrained)."""
    folder = Path(folder)
    for f in (WEIGHTS, CONFIG):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing: not a speft adapter folder")
    config = json.loads((folder / CONFIG).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    modules = config["modules"]
    for name, shape in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter module '{name}' does not exist in the model") from None
        if not isinstance(module, nn.Linear) or list(weight_shape(module)) != shape:
            raise ValueError(f"adapter module '{name}' expects a Linear of shape {shape}, found {module}")
    scaling = config["scaling"]
    layers = {}
    for name in modules:
        s = scaling[name] if isinstance(scaling, dict) else scaling
        layers.update(inject(model, {name: tensors[f"{name}.indices"].long()}, s))
        with torch.no_grad():
            layers[name].values.copy_(tensors[f"{name}.values"])
    return layers


def unload(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every sparse layer by its base layer: W0 + αΔ when ``merge``, else W0 exactly. On a quantized base
    the merged layer is a plain ``nn.Linear`` holding de-quantized W0 + αΔ in the compute dtype (the delta does not
    fit a 4-bit weight); unmerged, the quantized layer itself."""
    for name, layer in sparse_layers(model).items():
        if layer.quantized:
            base = plain_linear(layer.base, layer) if merge else layer.base
        else:
            layer.sync() if merge else layer.unmerge()
            base = layer.base
        replace_module(model, name, base)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain model whose weights hold W0 + αΔ (save it with ``save_pretrained``); on a quantized base every other
    quantized layer is de-quantized too, so the checkpoint is a plain float one."""
    unload(model, merge=True)
    quantized = quantized_layers(model)
    for name in quantized:
        replace_module(model, name, plain_linear(model.get_submodule(name)))
    if quantized:
        dequantised(model)  # no quantizer left: save_pretrained writes a plain checkpoint
    return model
