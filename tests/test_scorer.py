"""The run's scorer: a seeded first sample, fresh re-scoring examples apart from it, sizes, the cache."""

from __future__ import annotations

import torch

from speft.salience.base import MetricConfig, SalienceMetric
from speft.salience.scorer import ExampleStream, Scorer

ROWS = [{"input_ids": torch.tensor([i]), "labels": torch.tensor(i)} for i in range(40)]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


class Recorder(SalienceMetric):
    """Scores nothing; records which examples each call saw, batch by batch."""

    calls: list

    def score(self, ctx):
        self.calls.append([b["labels"].tolist() for b in ctx.batches()])
        assert ctx.num_examples == sum(len(b) for b in self.calls[-1])
        return {}


def scorer(num=8, factor=1, batch_size=3):
    metric = Recorder(MetricConfig(name="rec", num_score_examples=num, cache=False))
    metric.sample_factor, metric.calls = factor, []
    return Scorer(metric, ROWS, collate, torch.device("cpu"), batch_size=batch_size, seed=7), metric


def test_first_sample_is_a_seeded_permutation_prefix_in_batches():
    s, metric = scorer()
    s.score(torch.nn.Linear(1, 1), {})
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:8].tolist()
    assert metric.calls == [[expected[0:3], expected[3:6], expected[6:8]]]
    assert s.info["cache"] == "off" and s.info["examples"] == 8


def test_sample_factor_and_split_size_bound_the_sample():
    assert len(scorer(num=8, factor=2)[0].sample) == 16  # GraSP: two sets
    assert len(scorer(num=100)[0].sample) == 40


def test_rescoring_draws_fresh_examples_from_a_second_seeded_stream():
    s, metric = scorer(num=6)
    s.rescore(torch.nn.Linear(1, 1), {}, None)  # as many as the first sample
    s.rescore(torch.nn.Linear(1, 1), {}, 4)
    s.rescore(torch.nn.Linear(1, 1), {}, 50)  # at most the whole split
    seen = [sum(call, []) for call in metric.calls]
    stream = ExampleStream(list(range(40)), 8)
    assert seen == [[next(stream) for _ in range(n)] for n in (6, 4, 40)]
    assert seen[0] != [r["labels"].item() for r in s.sample]  # a stream apart from the first sample
