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
    """F.linear over the merged weight. Backward gathers the values' gradient from the transient dense
    weight gradient; the dense gradient itself is returned only when the weight asks for it (salience
    scoring during training: reselect and regrow masks)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, indices, scaling):
        ctx.save_for_backward(x, weight, indices)
        ctx.scaling = scaling
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            dense = g2.t().mm(x.reshape(-1, x.shape[-1]))  # transient (out, in)
            if ctx.needs_input_grad[1]:
                grad_values = dense.view(-1).index_select(0, indices).float()
                if ctx.scaling != 1.0:
                    grad_values.mul_(ctx.scaling)
            if ctx.needs_input_grad[2]:
                grad_weight = dense
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_values, grad_weight, grad_bias, None, None


class _SparseDelta(torch.autograd.Function):
    """y = x @ (α·scatter(values))ᵀ for the dropout path, where the delta cannot stay merged."""

    @staticmethod
    def forward(ctx, x, values, indices, shape, scaling):
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.scaling = shape, scaling
        return F.linear(x, _dense(values, indices, shape, scaling, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dense(values, indices, ctx.shape, ctx.scaling, grad_out.dtype)
        if ctx.needs_input_grad[1]:
            dense = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
            grad_values = dense.view(-1).index_select(0, indices).float().mul_(ctx.scaling)
        return grad_x, grad_values, None, None, None


def _dense(values, indices, shape, scaling, dtype) -> torch.Tensor:
    d = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    return d.index_copy_(0, indices, (scaling * values).to(dtype)).view(shape)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


class SparseDeltaLinear(nn.Module):
    """Wraps a ``nn.Linear``; trains ``values`` at flat ``indices`` of its weight."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, scaling: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        # Dropout on the delta's input, as in the reference implementation; with p > 0 the delta
        # cannot stay merged while training, so it takes a separate (slower) path.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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
        self._synced = None  # values._version last written into the weight; None: weight holds W0
        self._origin = None  # (indices, pretrained values) of all entries ever selected, after a reselect

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
        """Restore the pretrained weight exactly (also after reselections merged earlier deltas)."""
        w = self.base.weight.view(-1)
        w.index_copy_(0, self.indices.long(), self.base_values)
        if self._origin is not None:
            w.index_copy_(0, self._origin[0], self._origin[1])
        self._synced = None

    @torch.no_grad()
    def reselect(self, indices: torch.Tensor) -> nn.Parameter:
        """Merge the learned delta into the base, then train new ``indices`` from zero.

        The pretrained values of every entry ever selected are kept, so :meth:`unmerge` and
        :meth:`export` still refer to the original weight. Returns the new ``values`` parameter.
        """
        self.sync()
        w = self.base.weight.view(-1)
        old = self.indices.long()
        if self._origin is None:
            self._origin = (old.clone(), self.base_values.clone())
        idx = torch.sort(indices.reshape(-1).to(device=w.device, dtype=torch.int64)).values
        fresh = idx[~torch.isin(idx, self._origin[0])]  # untouched so far: they still hold W0
        self._origin = (torch.cat([self._origin[0], fresh]), torch.cat([self._origin[1], w[fresh].clone()]))
        self.indices = idx.to(self.indices.dtype)
        self.base_values = w[idx].clone()
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=w.device))
        self._synced = None
        return self.values

    @torch.no_grad()
    def regrow(self, slots: torch.Tensor, indices: torch.Tensor) -> None:
        """Drop the entries at ``slots`` (their weight returns to W0) and train ``indices`` there from zero.

        Entries in other slots keep their values (and, in the optimizer, their moments).
        """
        w = self.base.weight.view(-1)
        slots = slots.to(device=w.device, dtype=torch.int64)
        w.index_copy_(0, self.indices.long()[slots], self.base_values[slots])
        new = indices.to(device=w.device, dtype=torch.int64)
        self.indices[slots] = new.to(self.indices.dtype)
        self.base_values[slots] = w[new]
        self.values[slots] = 0.0
        self._synced = None

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, fp32 values) with W = W_pretrained + α·scatter(values): an adapter's content."""
        if self._origin is None:
            idx, values = self.indices.long(), self.values.detach().float()
        else:
            self.sync()
            idx, w0 = self._origin
            values = (self.base.weight.view(-1)[idx].float() - w0.float()) / self.scaling
        order = torch.argsort(idx)
        return idx[order].to(self.indices.dtype), values[order]

    def delta(self) -> torch.Tensor:
        """Dense α·Δ (for tests and analysis)."""
        d = torch.zeros(self.base.weight.numel(), dtype=torch.float32, device=self.values.device)
        d[self.indices.long()] = self.scaling * self.values.detach()
        return d.view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.dropout, nn.Dropout):
            if self._synced is not None:
                self.unmerge()
            delta = _SparseDelta.apply(self.dropout(x), self.values, self.indices.long(),
                                       tuple(self.base.weight.shape), self.scaling)
            return self.base(x) + delta
        self.sync()
        w = self.base.weight
        return _SparseDeltaLinear.apply(x, self.values, w, self.base.bias, self.indices.long(), self.scaling)


def inject(model: nn.Module, indices: dict[str, torch.Tensor], scaling: float = 1.0,
           dropout: float = 0.0) -> dict[str, SparseDeltaLinear]:
    """Replace each named ``nn.Linear`` by a :class:`SparseDeltaLinear` with the given indices."""
    layers = {}
    for name, idx in indices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        layer = SparseDeltaLinear(base, idx, scaling, dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
