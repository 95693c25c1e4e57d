"""The sparse delta layer: W = W0 + α·scatter(indices, values) on a frozen linear layer.

The base weight is kept merged (it holds W0 + α·Δ in its own dtype) so the forward pass is one
plain ``F.linear``. The trainable ``values`` are fp32 master copies, and ``base_values`` keeps W0 at
the selected entries, so the merged entries are rewritten from fp32 after every update (small
updates are not rounded away in bf16) and unmerging restores W0 bit-exactly. In backward, the
gradient of the values is gathered from one transient per-layer dense product; the base weight never
gets a ``.grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, weight, bias, indices, scaling):  # noqa: D401
        ctx.save_for_backward(x, weight, indices)
        ctx.scaling = scaling
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            dense = g2.t().mm(x2)  # transient (out, in), freed after the gather
            grad_values = dense.view(-1).index_select(0, indices).float()
            if ctx.scaling != 1.0:
                grad_values.mul_(ctx.scaling)
        return grad_x, grad_values, None, None, None, None


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


class SparseDeltaLinear(nn.Module):
    """Wraps a ``nn.Linear``; trains ``values`` at flat ``indices`` of its weight."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, scaling: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        weight = base.weight
        idx = torch.sort(indices.reshape(-1).to(torch.int64)).values
        if idx.numel() and (idx[0] < 0 or idx[-1] >= weight.numel()):
            raise ValueError("sparse indices outside the weight")
        self.scaling = float(scaling)
        self.register_buffer("indices", idx.to(device=weight.device, dtype=index_dtype(weight.numel())))
        self.register_buffer("base_values", weight.detach().reshape(-1)[idx].clone())
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=weight.device))
        self._synced = None  # values._version last written into the weight
        self.merged = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def sync(self) -> None:
        """Write W0 + α·values into the merged weight entries (after the values changed)."""
        if self._synced == self.values._version:
            return
        merged = self.base_values.float() + self.scaling * self.values
        self.base.weight.view(-1).index_copy_(0, self.indices.long(), merged.to(self.base.weight.dtype))
        self._synced = self.values._version

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly."""
        self.base.weight.view(-1).index_copy_(0, self.indices.long(), self.base_values)
        self._synced = None

    def delta(self) -> torch.Tensor:
        """Dense α·Δ (for tests and analysis)."""
        d = torch.zeros(self.base.weight.numel(), dtype=torch.float32, device=self.values.device)
        d[self.indices.long()] = self.scaling * self.values.detach()
        return d.view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync()
        w = self.base.weight
        return _SparseDeltaLinear.apply(x, self.values, w, self.base.bias, self.indices.long(), self.scaling)


def inject(model: nn.Module, indices: dict[str, torch.Tensor], scaling: float = 1.0) -> dict[str, SparseDeltaLinear]:
    """Replace each named ``nn.Linear`` by a :class:`SparseDeltaLinear` with the given indices."""
    layers = {}
    for name, idx in indices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        layer = SparseDeltaLinear(base, idx, scaling)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
