"""Every metric and every alias end to end under debug=fast on the packaged MiniLM: a complete
results.json recording the canonical metric and the scoring (cache, path, examples, peak memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speft import registry
from speft.pipeline import run
from speft.results import RESULTS_FILE
from speft.salience.cache import read

from .conftest import FEW_EVAL, compose_cfg

ALIASES = registry.aliases("metric")
OPTIONS = registry.names("metric") + sorted(ALIASES)  # canonical names first: their aliases then hit the cache
KEYS = {"config", "metrics", "trainable_params", "density", "mask", "timings", "peak_memory_mb", "status",
        "num_score_examples", "scoring"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("score-cache")


@pytest.mark.parametrize("option", OPTIONS)
def test_metric_runs_end_to_end(option, cache_dir, tmp_path):
    canonical = ALIASES.get(option, option)
    before = set((cache_dir / "scores").glob("*.safetensors")) if (cache_dir / "scores").exists() else set()
    run(compose_cfg("debug=fast", "logger=none", FEW_EVAL, "trainer.max_steps=2", f"metric={option}",
                    f"paths.cache_dir={cache_dir}"), run_dir=tmp_path)
    data = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert KEYS <= set(data) and data["status"] == "completed"
    assert data["config"]["metric"]["name"] == canonical
    assert data["timings"]["scoring_s"] > 0
    drawn = 64 if canonical == "grasp" else 32  # debug=fast: 32 scoring examples; GraSP draws two sets
    assert data["num_score_examples"] == drawn
    scoring = data["scoring"]
    assert scoring["examples"] == (0 if canonical in ("random", "magnitude", "synflow") else drawn)
    assert scoring["peak_memory_mb"] > 0 and scoring["memory_kind"] == "rss"
    if canonical in ("random", "magnitude"):
        assert scoring["cache"] == "off" and scoring["path"] is None
    else:
        path = Path(scoring["path"])
        assert path.exists() and path.parent == cache_dir / "scores" and path.name.startswith(canonical + "-")
        assert scoring["cache"] == ("hit" if path in before else "miss")
        # The run trained the entries its scores rank highest: per module, the selected count lies between
        # the entries above the budget's k-th score and those at or above it (ties), for a global top-k.
        scores, _ = read(path)
        k = data["budget"]["entries"]
        kth = torch.cat([s.reshape(-1) for s in scores.values()]).topk(k).values[-1]
        for name, m in data["mask"].items():
            assert int((scores[name] > kth).sum()) <= m["selected"] <= int((scores[name] >= kth).sum()), name
