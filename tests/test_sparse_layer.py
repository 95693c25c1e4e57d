"""The sparse delta layer equals the dense weight W0 + α·scatter(values), trains only its values,
and never touches entries outside its mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speft.sparse.layer import SparseDeltaLinear, inject, sparse_layers

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make(dtype, scaling=1.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(16, 12).to(dtype)
    idx = torch.randperm(16 * 12)[:40]
    layer = SparseDeltaLinear(base, idx, scaling)
    with torch.no_grad():
        layer.values.normal_()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_forward_and_gradients_match_dense_reference(dtype, scaling):
    layer = make(dtype, scaling)
    w0 = layer.base_values.float()
    dense = layer.weight.detach().float().clone().view(-1)
    dense[layer.indices.long()] = w0  # W0 everywhere
    dense = dense.view(12, 16)
    values = layer.values.detach().clone().requires_grad_(True)
    delta = torch.zeros(12 * 16).index_put((layer.indices.long(),), values * scaling).view(12, 16)

    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    x_ref = x.detach().float().clone().requires_grad_(True)
    y = layer(x)
    y_ref = nn.functional.linear(x_ref, dense + delta, layer.bias.float())
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])

    g = torch.randn_like(y_ref)
    y.backward(g.to(dtype))
    y_ref.backward(g)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(layer.values.grad, values.grad, **TOL[dtype])
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_only_masked_entries_change_and_unmerge_restores_base_exactly():
    layer = make(torch.float32)
    before = layer.weight.detach().clone()
    opt = torch.optim.AdamW([layer.values], lr=0.1)
    for _ in range(3):
        layer(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    layer.sync()
    after = layer.weight.detach()
    outside = torch.ones(before.numel(), dtype=torch.bool)
    outside[layer.indices.long()] = False
    assert torch.equal(after.view(-1)[outside], before.view(-1)[outside])
    assert not torch.equal(after, before)
    layer.unmerge()
    assert torch.equal(layer.weight.view(-1)[layer.indices.long()], layer.base_values)


def test_bf16_base_keeps_small_updates_in_fp32_values():
    layer = make(torch.bfloat16)
    with torch.no_grad():
        layer.values.zero_()
        layer.values.add_(1e-4)  # far below bf16 resolution of weights ~1e-1
    assert layer.values.dtype == torch.float32
    assert torch.all(layer.values == torch.tensor(1e-4))
    torch.testing.assert_close(layer.delta().view(-1)[layer.indices.long()], torch.full((40,), 1e-4))


def test_inject_replaces_named_linears():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = inject(model, {"0": torch.tensor([0, 5]), "2": torch.tensor([1])})
    assert set(sparse_layers(model)) == {"0", "2"} and layers["0"].values.numel() == 2
    assert layers["0"].indices.dtype == torch.int32
    with pytest.raises(ValueError):
        SparseDeltaLinear(nn.Linear(2, 2), torch.tensor([4]))


def test_dropout_path_matches_reference_and_eval_is_merged():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = SparseDeltaLinear(base, torch.randperm(192)[:30], scaling=2.0, dropout=0.5)
    with torch.no_grad():
        layer.values.normal_()
    w0 = base.weight.detach().clone()
    delta = layer.delta()
    x = torch.randn(4, 16)

    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x_drop = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, x @ w0.t() + base.bias + x_drop @ delta.t())
    y.sum().backward()
    torch.testing.assert_close(layer.values.grad, 2.0 * (torch.ones(4, 12).t() @ x_drop).view(-1)[layer.indices.long()])
    assert torch.equal(base.weight, w0)  # unmerged while training with dropout

    layer.eval()
    torch.testing.assert_close(layer(x), x @ (w0 + delta).t() + base.bias)
    layer.train()
    layer(x)
    assert torch.equal(base.weight, w0)  # unmerged again


def test_dense_weight_gradient_is_returned_when_asked_for_rescoring():
    layer = make(torch.float32)
    layer.weight.requires_grad_(True)  # what salience scoring does during reselect/regrow
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 12)
    layer(x).backward(g)
    torch.testing.assert_close(layer.weight.grad, g.reshape(-1, 12).t() @ x.reshape(-1, 16))
    assert layer.values.grad is not None
