"""``grad``: |ḡ|, the absolute value of the mean gradient over ``num_score_examples`` examples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, mean_gradient


@dataclass
class GradConfig(MetricConfig):
    name: str = "grad"


@register("metric", "grad", schema=GradConfig)
class Grad(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        return {name: g.abs_() for name, g in mean_gradient(ctx).items()}
