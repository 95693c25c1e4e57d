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

from .conftest import FEW_EVAL, compose_cfg

MASKS = registry.names("mask")


@pytest.mark.parametrize("selection", ["global", "local"])
@pytest.mark.parametrize("name", MASKS)
def test_every_mask_runs_with_an_exact_budget(name, selection, tmp_path):
    overrides = ["debug=fast", "logger=none", FEW_EVAL, f"mask={name}", f"mask.selection={selection}"]
    keys = {f.name for f in fields(registry.get("mask", name).schema)}
    if "update_every_steps" in keys:
        overrides.append("mask.update_every_steps=2")  # updates at steps 2 and 4 of debug=fast's 5
    if "end_fraction" in keys:
        overrides.append("mask.end_fraction=1.0")
    if "num_score_examples" in keys:  # re-scoring on debug=fast's one scoring batch, not the mask's 128 or 1024
        overrides.append("mask.num_score_examples=32")
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
        for m in data["mask"].values():  # MiniLM targets are all 384 x 384: every budget form gives one density
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
    schedule.bind(MaskRuntime(model, layers, opt, total_steps=100, entries=k, scorer=scorer))
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


def test_dynamic_paper_mode_is_reselect_with_the_papers_numbers(compose_config):
    from speft.masks.dynamic import DynamicMask, DynamicMaskConfig

    cfg = compose_config("mask=dynamic").mask
    assert (cfg.name, cfg.update_every_steps, cfg.num_score_examples, cfg.mode) == ("dynamic", 1000, 1024, "paper")
    scores = {"0": torch.rand(5, 6, generator=torch.Generator().manual_seed(1)),
              "2": torch.rand(4, 5, generator=torch.Generator().manual_seed(2))}
    asked = []
    schedule = DynamicMask(DynamicMaskConfig(update_every_steps=5))
    _, layers, opt, _ = setup_runtime(schedule, lambda n: asked.append(n) or scores)
    assert schedule.on_step_end(4) is None
    record = schedule.on_step_end(5)
    assert asked == [1024] and record["kind"] == "dynamic"
    # selected anew: exactly the top-12 of the scores, values zero, fresh moments
    expected = schedule.select(scores, 12)
    for name, layer in layers.items():
        assert torch.equal(layer.indices.long(), expected[name])
        assert torch.all(layer.values == 0) and layer.values not in opt.state


@pytest.mark.parametrize("accum,per_epoch,fires", [
    (1, 0, [3, 6, 9]),       # every 3rd micro-batch, no epoch boundary
    (1, 7, [3, 6, 10, 13]),  # the count restarts each epoch of 7 micro-batches: 3, 6 | 3, 6 (steps 10, 13)
    (2, 0, [2, 3, 5, 6, 8, 9]),  # accumulation: the first optimizer step at or after micro-batches 3, 6, 9, ...
])
def test_dynamic_released_mode_merges_zeroes_resets_and_keeps_the_mask(accum, per_epoch, fires):
    """The released code's dynamic mode, written out: every N-th micro-batch of an epoch, W += delta,
    values = 0, Adam state of the values cleared, the same indices."""
    from speft.masks.dynamic import DynamicMask, DynamicMaskConfig

    def no_scoring(n):
        raise AssertionError("mode=released never re-scores")

    schedule = DynamicMask(DynamicMaskConfig(update_every_steps=3, mode="released"))
    model, layers, opt, _ = setup_runtime(schedule, no_scoring)
    schedule.runtime.grad_accum_steps, schedule.runtime.batches_per_epoch = accum, per_epoch
    indices = {n: layer.indices.clone() for n, layer in layers.items()}
    fired = []
    for step in range(1, 14 if per_epoch else 10):
        # train a little so that there is a delta and Adam state to merge and clear
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        x = torch.randn(3, 6)
        before = model(x).detach()
        for layer in layers.values():
            layer.sync()
        weights = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}  # W0 + delta
        if schedule.on_step_end(step):
            fired.append(step)
            torch.testing.assert_close(model(x), before)  # merged: the function is unchanged
            for name, layer in layers.items():
                assert torch.equal(layer.indices, indices[name])  # the mask is unchanged
                assert torch.all(layer.values == 0) and layer.values not in opt.state
                assert any(p is layer.values for p in opt.param_groups[0]["params"])
                layer.sync()
                assert torch.equal(layer.base.weight, weights[name])  # W ← W0 + delta, values restart at 0
                assert torch.equal(layer.base_values, weights[name].view(-1)[layer.indices.long()])
    assert fired == fires


def test_a_dynamic_schedule_that_cannot_fire_warns_naming_both_numbers(caplog):
    from speft.masks.dynamic import DynamicMask, DynamicMaskConfig

    with caplog.at_level("WARNING"):
        setup_runtime(DynamicMask(DynamicMaskConfig()), lambda n: {})  # 1000 steps, a run of 100
    assert "every 1000 optimizer steps" in caplog.text and "the run has 100" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        setup_runtime(DynamicMask(DynamicMaskConfig(update_every_steps=99)), lambda n: {})
    assert caplog.text == ""


def test_dynamic_mode_must_be_a_known_name():
    from speft.masks.dynamic import DynamicMaskConfig
    from speft.registry import ConfigError

    with pytest.raises(ConfigError, match="paper, released"):
        DynamicMaskConfig(mode="rigl")


def test_dynamic_released_mode_end_to_end_keeps_the_initial_mask(tmp_path, caplog):
    """The pipeline hands the schedule the epoch length and accumulation: updates at micro-batches 2, 4
    of debug=fast's 5 steps, each a merge/zero/reset, the final mask the initial one."""
    overrides = ["debug=fast", "logger=none", "mask=dynamic", "mask.mode=released", "mask.update_every_steps=2",
                 "trainer.grad_accum_steps=1", "method.save_adapter=false"]
    run(compose_cfg(*overrides), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed"
    assert [(u["step"], u["kind"], u["changed"]) for u in data["mask_updates"]] == [(2, "merge_reset", 0),
                                                                                 (4, "merge_reset", 0)]
    assert all(u["overlap_initial"] == 1.0 for u in data["mask_updates"])
    assert data["mask_final"] == {n: {"selected": m["selected"], "total": m["total"]} for n, m in data["mask"].items()}
