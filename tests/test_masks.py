"""Mask schedules: every schedule × selection runs end to end with an exact budget; reselect and
regrow keep the promised state (values, Adam moments, pretrained weights) exactly."""

from __future__ import annotations

import json
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from speft import registry
from speft.masks.base import MaskRuntime
from speft.masks.regrow import RegrowMask, RegrowMaskConfig, drop_fraction_at
from speft.masks.reselect import ReselectMask, ReselectMaskConfig
from speft.pipeline import run
from speft.sparse.layer import inject

from .conftest import compose_cfg

MASKS = registry.names("mask")


@pytest.mark.parametrize("selection", ["global", "local"])
@pytest.mark.parametrize("name", MASKS)
def test_every_mask_runs_with_an_exact_budget(name, selection, tmp_path):
    overrides = ["debug=fast", "logger=none", f"mask={name}", f"mask.selection={selection}"]
    keys = {f.name for f in fields(registry.get("mask", name).schema)}
    if "update_every_steps" in keys:
        overrides.append("mask.update_every_steps=2")  # updates at steps 2 and 4 of debug=fast's 5
    if "end_fraction" in keys:
        overrides.append("mask.end_fraction=1.0")
    result = run(compose_cfg(*overrides), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    k = data["budget"]["entries"]
    assert data["status"] == "completed"
    assert sum(m["selected"] for m in data["mask"].values()) == k
    assert sum(layer.values.numel() for layer in _layers(result.model)) == k
    if registry.get("mask", name).obj.dynamic:
        assert [u["step"] for u in data["mask_updates"]] == [2, 4]
        assert sum(m["selected"] for m in data["mask_final"].values()) == k
        assert all(0 <= u["overlap_initial"] <= 1 for u in data["mask_updates"])
    if selection == "local":
        for m in data["mask"].values():  # the same density in every module (up to rounding)
            assert abs(m["selected"] / m["total"] - k / data["budget"]["target_entries"]) < 1e-4
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


def _layers(model):
    from speft.sparse.layer import sparse_layers

    return list(sparse_layers(model).values())


def setup_runtime(schedule, score_fn, k=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    layers = inject(model, {"0": torch.arange(0, 30, 5), "2": torch.arange(0, 20, 3)[:6]})
    params = [layer.values for layer in layers.values()]
    opt = torch.optim.AdamW([{"params": params, "name": "sparse", "lr": 0.05}])
    for _ in range(3):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    scorer = SimpleNamespace(rescore=lambda model, targets, n: score_fn(n))  # the run's Scorer, faked
    schedule.bind(MaskRuntime(model, layers, opt, total_steps=100, budget=k, scorer=scorer))
    return model, layers, opt, original


def test_regrow_keeps_survivors_exactly_and_resets_the_rest():
    cfg = RegrowMaskConfig(update_every_steps=10, drop_fraction=0.5, end_fraction=1.0)
    scores = {"0": torch.arange(30.0).view(5, 6), "2": torch.arange(20.0).view(4, 5)}
    schedule = RegrowMask(cfg)
    model, layers, opt, original = setup_runtime(schedule, lambda n: scores)
    before = {n: (m.indices.clone(), m.values.detach().clone(), opt.state[m.values]["exp_avg"].clone(),
                  opt.state[m.values]["exp_avg_sq"].clone()) for n, m in layers.items()}
    record = schedule.on_step_end(10)
    frac = drop_fraction_at(10, 100, cfg)
    assert record["dropped"] == record["grown"] == sum(round(frac * 6) for _ in layers)
    for name, layer in layers.items():
        idx0, v0, m0, s0 = before[name]
        n_drop = round(frac * 6)
        dropped = torch.sort(v0.abs(), stable=True).indices[:n_drop]
        kept = torch.ones(6, dtype=torch.bool)
        kept[dropped] = False
        assert torch.equal(layer.indices[kept], idx0[kept])  # survivors: same slot, value and moments
        assert torch.equal(layer.values.detach()[kept], v0[kept])
        assert torch.equal(opt.state[layer.values]["exp_avg"][kept], m0[kept])
        assert torch.equal(opt.state[layer.values]["exp_avg_sq"][kept], s0[kept])
        assert torch.all(layer.values.detach()[dropped] == 0)
        assert torch.all(opt.state[layer.values]["exp_avg"][dropped] == 0)
        grown = layer.indices[dropped].long()
        assert set(grown.tolist()).isdisjoint(idx0[kept].tolist())
        assert len(set(layer.indices.tolist())) == 6  # exact budget, no duplicates
        # grown entries are the highest-scoring entries that were not kept
        flat = scores[name].flatten().clone()
        flat[idx0[kept].long()] = -1
        best = torch.sort(flat, descending=True, stable=True).indices[:n_drop]
        assert sorted(grown.tolist()) == sorted(best.tolist())
        # dropped entries are back at the pretrained weight, kept ones at W0 + value
        layer.sync()
        w = model.get_submodule(name).weight.view(-1)
        w0 = original[f"{name}.weight"].view(-1)
        gone = idx0[dropped].long()
        gone = gone[~torch.isin(gone, layer.indices.long())]
        assert torch.equal(w[gone], w0[gone])
        torch.testing.assert_close(w[layer.indices.long()], w0[layer.indices.long()] + layer.values.detach())


def test_reselect_merges_restarts_and_still_exports_the_full_delta(tmp_path):
    scores = {"0": torch.rand(5, 6, generator=torch.Generator().manual_seed(1)),
              "2": torch.rand(4, 5, generator=torch.Generator().manual_seed(2))}
    schedule = ReselectMask(ReselectMaskConfig(update_every_steps=5))
    model, layers, opt, original = setup_runtime(schedule, lambda n: scores)
    x = torch.randn(3, 6)
    expected = model(x).detach()
    record = schedule.on_step_end(5)
    assert record["kept"] + record["changed"] == 12
    assert sum(layer.values.numel() for layer in layers.values()) == 12
    group = opt.param_groups[0]["params"]
    for layer in layers.values():
        assert torch.all(layer.values == 0) and any(p is layer.values for p in group)
        assert layer.values not in opt.state  # fresh moments
    torch.testing.assert_close(model(x), expected)  # merging changed nothing yet

    # The adapter export is relative to the pretrained weights, covering every entry ever trained.
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    fresh.load_state_dict(original)
    from speft.sparse.io import load_adapter, save_adapter, unload

    save_adapter(model, tmp_path)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=1e-6)
    unload(model, merge=False)
    for n, p in model.state_dict().items():
        assert torch.equal(p, original[n]), n
