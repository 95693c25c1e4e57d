"""The run's scorer: one object that turns "score the targets" into salience scores.

It holds the metric, the seeded sample of training examples the first scores come from, a seeded
stream of fresh examples for dynamic masks' re-scoring, the collation and device of their batches,
and the score cache's key facts. The pipeline builds one per run for methods that use salience;
``method.prepare`` calls :meth:`Scorer.score` and a dynamic mask :meth:`Scorer.rescore` (through
``MaskRuntime.score``).

Data-parallel runs (:mod:`speft.distributed`): every rank draws the same sample and stream; the
scoring batches are the single-process ones, dealt round-robin to the ranks (batch i to rank
i mod N), and each metric sums its accumulators over the ranks (``ScoreContext.reduce``), so every
rank ends with the same scores, equal to one process's up to float summation order. Data-free
metrics (``random``, ``magnitude``, ``synflow``) are computed in full on every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from speft.distributed import SINGLE, Dist
from speft.salience.base import SalienceMetric, ScoreContext
from speft.salience.cache import compute_scores


class ExampleStream:
    """Endless seeded reshuffles of ``rows``; its position is a state dict (a checkpoint resumes it)."""

    def __init__(self, rows: list[dict], seed: int) -> None:
        self.rows = rows
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(len(self.rows), generator=self.g).tolist(), 0
        self.pos += 1
        return self.rows[self.order[self.pos - 1]]

    def state_dict(self) -> dict:
        return {"generator": self.g.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["generator"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


class Scorer:
    """Scores for one run. The first sample holds ``metric.sample_factor`` (GraSP: 2) times
    ``metric.num_score_examples`` examples, at most the whole split."""

    def __init__(self, metric: SalienceMetric, rows: list[dict], collate: Callable[[list[dict]], dict],
                 device: torch.device, *, batch_size: int, seed: int, cache_dir=None,
                 key: dict[str, Any] | None = None, dist: Dist = SINGLE) -> None:
        self.metric, self.rows, self.collate, self.device, self.dist = metric, rows, collate, device, dist
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.key = {**(key or {}), "train_examples": len(rows), "batch_size": batch_size}
        n = min(metric.sample_factor * metric.cfg.num_score_examples, len(rows))
        g = torch.Generator().manual_seed(seed)
        self.sample = [rows[i] for i in torch.randperm(len(rows), generator=g)[:n].tolist()]
        self._stream = ExampleStream(rows, seed + 1)  # dynamic masks' fresh examples, apart from the sample
        self.info: dict[str, Any] = {}  # the first scoring's cache record and peak memory (results.json)

    def offsets(self, rows: list[dict]) -> list[int]:
        """Where each of this rank's batches starts in ``rows`` (all batches in one process)."""
        starts = list(range(0, len(rows), self.batch_size))
        if self.dist.enabled and not self.metric.data_free:
            starts = starts[self.dist.rank :: self.dist.world]
        return starts

    def batches(self, rows: list[dict]) -> Callable[[], Iterator[dict]]:
        """A fresh pass over this rank's batches of ``rows`` on each call (a metric may take several)."""
        return functools.partial(self.iterate, rows)

    def iterate(self, rows: list[dict]) -> Iterator[dict]:
        for i in self.offsets(rows):
            batch = self.collate(rows[i : i + self.batch_size])
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def context(self, model: nn.Module, targets: dict[str, nn.Module], rows: list[dict]) -> ScoreContext:
        ctx = ScoreContext(model, targets, self.batches(rows), len(rows), self.seed)
        if self.dist.enabled and not self.metric.data_free:
            ctx.reduce, ctx.offsets = self.dist.all_reduce_, lambda: self.offsets(rows)
        return ctx

    def score(self, model: nn.Module, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """Scores of ``targets`` on the seeded sample, from the score cache when it holds them."""
        ctx = self.context(model, targets, self.sample)
        scores, self.info = compute_scores(self.metric, ctx, self.cache_dir, self.key, self.device, self.dist)
        return scores

    def state_dict(self) -> dict:
        """The position of the fresh-example stream (the first sample is seeded and rebuilt)."""
        return {"stream": self._stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state["stream"])

    def rescore(self, model: nn.Module, targets: dict[str, nn.Module], n: int | None = None) -> dict[str, torch.Tensor]:
        """Scores at the current weights on ``n`` fresh examples of the stream (None: as many as the
        first sample), at most the whole split; never cached."""
        n = min(n or len(self.sample), len(self.rows))
        rows = [next(self._stream) for _ in range(n)]
        return self.metric.compute(self.context(model, targets, rows))
