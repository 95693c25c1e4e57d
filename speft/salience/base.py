"""Salience metrics: one fp32 score per entry of every target weight; higher = more worth training.

A metric receives a :class:`ScoreContext` and returns ``{target name: scores shaped like its weight}``.
Only target weights get score buffers. Gradients of the targets are folded into their fp32
accumulators as soon as autograd produces them (post-accumulate-grad hooks) and freed at once, and
no other parameter keeps a gradient, so scoring needs the model, one batch's activations and one
fp32 buffer per target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from speft.config import check_positive


@dataclass
class MetricConfig:
    name: str = "???"  # the option's name, the same as its YAML file
    num_score_examples: int = 1024  # training examples the scores are computed from (the study's default)
    batch_size: Optional[int] = None  # scoring batch size; null = trainer.batch_size

    def __post_init__(self) -> None:
        check_positive(self, "metric", "num_score_examples", "batch_size")


@dataclass
class ScoreContext:
    model: nn.Module
    targets: dict[str, nn.Linear]
    batches: Callable[[], Iterable[dict]]  # a fresh iterator over the scoring batches (on the device)
    num_examples: int  # examples the batches hold in total
    seed: int


class SalienceMetric:
    def __init__(self, cfg: MetricConfig) -> None:
        self.cfg = cfg

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def mean_gradient(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over all ``ctx.num_examples`` examples, per target weight (fp32)."""
    model, targets = ctx.model, ctx.targets
    acc = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
           for name, m in targets.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for name, m in targets.items():
            w = m.weight
            w.requires_grad_(True)

            def fold(param: torch.Tensor, buf: torch.Tensor = acc[name]) -> None:
                buf.add_(param.grad)
                param.grad = None

            handles.append(w.register_post_accumulate_grad_hook(fold))
        was_training = model.training
        model.eval()  # no dropout: scores are a property of the pretrained weights
        for batch in ctx.batches():
            n = batch["labels"].shape[0]
            loss = model(**batch).loss * (n / ctx.num_examples)
            loss.backward()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return acc
