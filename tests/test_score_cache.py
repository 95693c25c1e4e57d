"""The score cache: computed once, reused on a matching key, never used when stale or corrupt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from speft import registry
from speft.salience import cache
from speft.salience.base import ScoreContext

DESCRIPTION = {"model": {"name": "tiny"}, "task": {"name": "toy"}, "split": "train"}


def make(name, **overrides):
    entry = registry.get("metric", name)
    return entry.obj(entry.schema(**overrides))


def context(tiny, seed=0):
    model, targets, batches = tiny
    n = sum(b["labels"].shape[0] for b in batches)
    return ScoreContext(model, targets, lambda: iter(batches), n, seed)


@pytest.fixture
def counted(monkeypatch):
    """The grad metric, counting how often it really computes."""
    from speft.salience.grad import Grad

    calls = []
    original = Grad.score

    def score(self, ctx):
        calls.append(1)
        return original(self, ctx)

    score.__doc__ = "counting wrapper"
    monkeypatch.setattr(Grad, "score", score)
    return calls


def test_second_call_is_a_hit_with_identical_scores(tiny, tmp_path, counted):
    first, info1 = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    second, info2 = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    assert (info1["cache"], info2["cache"]) == ("miss", "hit") and len(counted) == 1
    assert info1["path"] == info2["path"] and info1["path"].startswith(str(tmp_path / "scores" / "grad-"))
    assert info1["examples"] == 10 and info1["peak_memory_mb"] > 0 and info1["memory_kind"] == "rss"
    for name in first:
        assert torch.equal(first[name], second[name]) and second[name].dtype == torch.float32


def test_key_covers_settings_but_not_the_cache_switch(tiny):
    base = cache.digest(cache.key_document(make("grad"), context(tiny), DESCRIPTION))
    same = cache.digest(cache.key_document(make("grad", cache=False, offload=True), context(tiny), DESCRIPTION))
    assert base == same
    for other in [cache.key_document(make("grad", num_score_examples=8), context(tiny), DESCRIPTION),
                  cache.key_document(make("grad", abs_per_batch=True), context(tiny), DESCRIPTION),
                  cache.key_document(make("grad"), context(tiny, seed=1), DESCRIPTION),
                  cache.key_document(make("grad"), context(tiny), {**DESCRIPTION, "split": "validation"}),
                  cache.key_document(make("snip"), context(tiny), DESCRIPTION)]:
        assert cache.digest(other) != base


def _stale_key(path, scores):
    save_file({k: v.contiguous() for k, v in scores.items()}, str(path),
              metadata={"key": "{}", "checksum": cache.checksum(scores)})


def _garbage(path, scores):
    path.write_bytes(b"not a safetensors file")


def _truncated(path, scores):
    path.write_bytes(path.read_bytes()[:-7])


def _tampered(path, scores):  # right key, values changed after the checksum was taken
    tensors, metadata = cache.read(path)
    tensors["q"][0, 0] += 1.0
    save_file(tensors, str(path), metadata=metadata)


def _nan(path, scores):  # right key and a matching checksum, but NaN inside
    tensors, metadata = cache.read(path)
    tensors["q"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={**metadata, "checksum": cache.checksum(tensors)})


def _wrong_shape(path, scores):
    tensors, metadata = cache.read(path)
    tensors["q"] = tensors["q"][:, :-1].contiguous()
    save_file(tensors, str(path), metadata={**metadata, "checksum": cache.checksum(tensors)})


@pytest.mark.parametrize("damage", [_stale_key, _garbage, _truncated, _tampered, _nan, _wrong_shape])
def test_stale_or_corrupt_file_is_recomputed_and_rewritten(damage, tiny, tmp_path, counted, caplog):
    good, info = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    damage(Path(info["path"]), good)
    with caplog.at_level(logging.WARNING, logger="speft.salience.cache"):
        again, info2 = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    assert info2["cache"] == "miss" and len(counted) == 2
    assert "stale or corrupt score cache" in caplog.text and "recomputing" in caplog.text
    for name in good:
        assert torch.equal(good[name], again[name])
    _, info3 = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    assert info3["cache"] == "hit" and len(counted) == 2  # the rewritten file is valid


def test_cache_off_by_switch_by_missing_folder_and_for_cheap_metrics(tiny, tmp_path, counted):
    _, info = cache.compute_scores(make("grad", cache=False), context(tiny), tmp_path, DESCRIPTION)
    assert info["cache"] == "off" and info["path"] is None
    _, info = cache.compute_scores(make("grad"), context(tiny), None, DESCRIPTION)
    assert info["cache"] == "off"
    for name in ("random", "magnitude"):
        _, info = cache.compute_scores(make(name), context(tiny), tmp_path, DESCRIPTION)
        assert info["cache"] == "off" and info["examples"] == 0
    assert not (tmp_path / "scores").exists() and len(counted) == 2


def test_an_edited_metric_does_not_read_old_scores(tiny, tmp_path, monkeypatch):
    from speft.salience.grad import Grad

    _, info = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    ones = lambda self, ctx: {n: torch.ones(m.weight.shape) for n, m in ctx.targets.items()}  # noqa: E731
    monkeypatch.setattr(Grad, "score", ones)
    scores, info2 = cache.compute_scores(make("grad"), context(tiny), tmp_path, DESCRIPTION)
    assert info2["cache"] == "miss" and info2["path"] != info["path"]
    assert all(torch.equal(s, torch.ones_like(s)) for s in scores.values())
