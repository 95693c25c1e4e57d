"""The sparse delta layer equals the dense weight W0 + α·scatter(values), trains only its values,
and never touches entries outside its mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from speft.sparse.layer import SparseDeltaLinear, candidate_plans, inject, sparse_layers

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
    dense = g.reshape(-1, 12).t() @ x.reshape(-1, 16)
    torch.testing.assert_close(layer.weight.grad, dense)
    torch.testing.assert_close(layer.values.grad, layer.scaling * dense.reshape(-1)[layer.indices.long()])


# --- the values' gradient from the plan's blocks equals the dense product's, whatever the mask ----------------

OUT, IN = 200, 160  # several 64-row and 64-column bands


def mask(kind: str, k: int = 300, seed: int = 0) -> torch.Tensor:
    """Flat indices of an (OUT, IN) weight: uniformly random, clustered in a few rows and columns (what
    salience masks look like), clustered in a band of rows or of columns, one entry, or none."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randperm(OUT * IN, generator=g)[:k]
    if kind == "empty":
        return torch.empty(0, dtype=torch.long)
    if kind == "single":
        return torch.tensor([OUT * IN - 7])
    rows = {"clustered": torch.randperm(OUT, generator=g)[:12], "row_band": torch.arange(70, 100),
            "col_band": torch.randperm(OUT, generator=g)}[kind]
    cols = {"clustered": torch.randperm(IN, generator=g)[:15], "row_band": torch.randperm(IN, generator=g),
            "col_band": torch.arange(130, 140)}[kind]
    cand = (rows[:, None] * IN + cols[None, :]).reshape(-1)
    return cand[torch.randperm(cand.numel(), generator=g)[:k]]


MASKS = ("random", "clustered", "row_band", "col_band", "single", "empty")


def dense_reference(x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """The old path: the full dense weight gradient, gathered at the indices (fp32)."""
    dense = g.reshape(-1, OUT).double().t() @ x.reshape(-1, IN).double()
    return (scaling * dense.view(-1)[idx]).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_values_gradient_equals_dense_path(kind, dtype, scaling):
    torch.manual_seed(1)
    idx = mask(kind)
    layer = SparseDeltaLinear(nn.Linear(IN, OUT).to(dtype), idx, scaling)
    x, g = torch.randn(3, 7, IN, dtype=dtype), torch.randn(3, 7, OUT, dtype=dtype)
    layer(x).backward(g)
    ref = dense_reference(x, g, layer.indices.long(), scaling)
    assert layer.values.grad.shape == (idx.numel(),) and layer.values.grad.dtype == torch.float32
    if kind == "empty":
        assert layer.plan.kind == "empty" and layer.plan.computed == 0
        return
    if dtype == torch.float32:
        assert rel_err(layer.values.grad, ref) <= 1e-6
    else:  # bf16 products round their outputs: within one bf16 rounding of the exact values
        torch.testing.assert_close(layer.values.grad, ref, rtol=2 ** -7, atol=1e-2 * float(ref.abs().max()))
        dense_bf16 = (g.reshape(-1, OUT).t() @ x.reshape(-1, IN)).view(-1)[layer.indices.long()].float() * scaling
        torch.testing.assert_close(layer.values.grad, dense_bf16, rtol=2 ** -7, atol=1e-2 * float(ref.abs().max()))


def test_plans_pick_the_mask_structure_and_compute_less_than_dense():
    kinds = {k: SparseDeltaLinear(nn.Linear(IN, OUT), mask(k)).plan for k in MASKS}
    spread = SparseDeltaLinear(nn.Linear(IN, OUT), mask("random", k=6000)).plan
    assert spread.kind == "dense" and spread.fraction == 1.0  # 6000 random entries (19 %): the dense product
    sampled = SparseDeltaLinear(nn.Linear(IN, OUT), mask("random", k=3000)).plan
    assert sampled.kind == "sampled" and sampled.computed == 3000  # 9 %: one dot product per entry is cheaper
    assert kinds["random"].fraction < 1.0  # 300 entries
    assert kinds["clustered"].kind == "rows_cols" and kinds["clustered"].computed == 12 * 15
    assert kinds["row_band"].kind in ("rows_cols", "row_bands") and kinds["row_band"].fraction <= 30 * IN / (OUT * IN)
    assert kinds["col_band"].kind in ("rows_cols", "col_bands") and kinds["col_band"].fraction <= 10 * OUT / (OUT * IN)
    assert kinds["single"].computed == 1 and kinds["empty"].computed == 0
    # banded: two clusters far apart; one block each beats their rows × columns product
    a = (torch.arange(0, 40)[:, None] * IN + torch.arange(0, 40)[None, :]).reshape(-1)
    b = (torch.arange(150, 190)[:, None] * IN + torch.arange(100, 140)[None, :]).reshape(-1)
    plan = SparseDeltaLinear(nn.Linear(IN, OUT), torch.cat([b, a])).plan
    assert plan.kind in ("row_bands", "col_bands") and plan.computed == 2 * 40 * 40


@pytest.mark.parametrize("kind", ["clustered", "random", "row_band"])
def test_dropout_path_values_gradient_equals_dense_path(kind):
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(IN, OUT), mask(kind), scaling=2.0, dropout=0.3)
    x, g = torch.randn(4, 5, IN), torch.randn(4, 5, OUT)
    torch.manual_seed(5)
    layer(x).backward(g)
    torch.manual_seed(5)
    x_drop = nn.functional.dropout(x, 0.3, training=True)
    assert rel_err(layer.values.grad, dense_reference(x_drop, g, layer.indices.long(), 2.0)) <= 1e-6


@pytest.mark.parametrize("kind", ["clustered", "random", "empty"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_values_gradient(kind, dropout):
    from torch.utils.checkpoint import checkpoint

    def run(ckpt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        first = SparseDeltaLinear(nn.Linear(IN, IN), torch.randperm(IN * IN)[:50], 0.5, dropout)
        layer = SparseDeltaLinear(nn.Linear(IN, OUT), mask(kind), 0.5, dropout)
        x = torch.randn(2, 6, IN)
        torch.manual_seed(9)
        body = lambda t: layer(torch.tanh(first(t)))  # noqa: E731
        y = checkpoint(body, x, use_reentrant=False) if ckpt else body(x)
        y.pow(2).sum().backward()
        return first.values.grad, layer.values.grad

    for plain, ckpt in zip(run(False), run(True)):
        torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)


def test_plan_is_cached_and_rebuilt_when_a_dynamic_mask_changes_the_indices():
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(IN, OUT), mask("clustered"))
    plan = layer.plan
    assert layer.plan is plan and plan.idx.data_ptr() == layer.indices.data_ptr()  # its int32 buffer, no copy
    x, g = torch.randn(8, IN), torch.randn(8, OUT)

    def check():
        layer.values.grad = None
        layer(x).backward(g)
        assert rel_err(layer.values.grad, dense_reference(x, g, layer.indices.long(), 1.0)) <= 1e-6

    slots = torch.tensor([0, 5, 17])
    layer.regrow(slots, torch.tensor([OUT * IN - 1, 3, 7777]))  # indices no longer sorted
    assert layer.plan is not plan and torch.equal(layer.plan.idx, layer.indices.long())
    check()
    layer.reselect(mask("row_band"))
    assert torch.equal(layer.plan.idx, layer.indices.long())
    check()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["indices"] = mask("col_band").sort().values.to(layer.indices.dtype)
    layer.load_state_dict(state)  # in place: the version changes
    assert torch.equal(layer.plan.idx, layer.indices.long())
    check()


def test_dense_weight_gradient_still_returned_with_a_structured_plan():
    layer = SparseDeltaLinear(nn.Linear(IN, OUT), mask("clustered"), scaling=0.5)
    assert layer.plan.kind != "dense"
    layer.weight.requires_grad_(True)
    x, g = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    layer(x).backward(g)
    torch.testing.assert_close(layer.weight.grad, g.reshape(-1, OUT).t() @ x.reshape(-1, IN))
    assert rel_err(layer.values.grad, dense_reference(x, g, layer.indices.long(), 0.5)) <= 1e-6


def test_the_sampled_product_is_offered_only_where_its_cost_was_measured(monkeypatch):
    from speft.sparse import layer as sparse_layer

    idx = mask("random", k=3000)
    cpu = sparse_layer.PLAN_COSTS["cpu"]
    monkeypatch.setitem(sparse_layer.PLAN_COSTS, "cpu", dataclasses.replace(cpu, sampled=None))
    assert "sampled" not in [p.kind for p, _ in candidate_plans(idx, (OUT, IN))]
    monkeypatch.delitem(sparse_layer.PLAN_COSTS, "cpu")  # a device type without measured costs (CUDA today)
    assert [p.kind for p, _ in candidate_plans(idx, (OUT, IN))] == ["dense"]
    assert SparseDeltaLinear(nn.Linear(IN, OUT), idx).plan.kind == "dense"


@pytest.mark.parametrize("kind", ["random", "clustered", "row_band", "col_band", "single"])
def test_every_candidate_structure_gives_the_dense_gradient(kind):
    torch.manual_seed(2)
    idx = mask(kind)[torch.randperm(mask(kind).numel())]  # unsorted, as after a regrow
    x, g = torch.randn(9, IN), torch.randn(9, OUT)
    ref = dense_reference(x, g, idx, 1.0)
    plans = candidate_plans(idx, (OUT, IN))
    assert [p.kind for p, _ in plans] == ["dense", "rows_cols", "row_bands", "col_bands", "sampled"]  # on CPU
    for plan, _ in plans:
        assert rel_err(plan.values_grad(g, x), ref) <= 1e-6, plan.kind
        rows = set((idx // IN).tolist())
        assert plan.computed >= len(idx) and (plan.kind == "dense" or plan.computed <= len(rows) * IN)


def test_measured_plan_costs_are_read_per_device_type_and_a_malformed_file_is_named(tmp_path):
    from speft.sparse.layer import PlanCosts, measured_costs

    assert measured_costs(tmp_path / "absent.json") == {}
    path = tmp_path / "plan_costs.json"
    path.write_text('{"cuda": {"gather": 4.0, "block": 2000.0, "sampled": null}}')
    assert measured_costs(path) == {"cuda": PlanCosts(gather=4.0, block=2000.0, sampled=None)}
    path.write_text('{"cuda": {"gather": 4.0}}')
    with pytest.raises(ValueError, match="plan_costs.json: expected"):
        measured_costs(path)
