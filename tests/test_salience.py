"""Salience metrics: recorded properties for every registered metric, brute-force references per metric."""

from __future__ import annotations

import pytest
import torch

from speft import registry
from speft.salience.base import ScoreContext

METRICS = registry.names("metric")


def context(model, targets, batches, seed=0):
    n = sum(b["labels"].shape[0] for b in batches)
    return ScoreContext(model, targets, lambda: iter(batches), n, seed)


def make_metric(name):
    entry = registry.get("metric", name)
    return entry.obj(entry.schema())


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_scores_every_target_and_leaves_the_model_untouched(name, tiny):
    model, targets, batches = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = make_metric(name).score(context(model, targets, batches))
    again = make_metric(name).score(context(model, targets, batches))
    assert set(scores) == set(targets)
    for t, s in scores.items():
        assert s.shape == targets[t].weight.shape and s.dtype == torch.float32
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, again[t], atol=0, rtol=1e-6)  # deterministic
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n]


def full_batch(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_grad_is_abs_of_the_mean_gradient_over_all_examples(tiny):
    """Batches of unequal size (4, 4, 2) must be weighted so the result is the mean over examples."""
    model, targets, batches = tiny
    scores = make_metric("grad").score(context(model, targets, batches))
    model.zero_grad()
    model.eval()
    model(**full_batch(batches)).loss.backward()
    for name, module in targets.items():
        torch.testing.assert_close(scores[name], module.weight.grad.abs(), atol=1e-7, rtol=1e-5)


def test_scoring_keeps_no_gradient_outside_the_targets(tiny):
    model, targets, batches = tiny
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g, p=p: seen.append(p))
    make_metric("grad").score(context(model, targets, batches))
    target_weights = {id(m.weight) for m in targets.values()}
    assert seen and all(id(p) in target_weights for p in seen)
