"""``grad`` (alias ``gradient``): |ḡ|, the absolute value of the mean gradient over ``num_score_examples``
examples (absolute value taken after averaging; ``abs_per_batch=true``: mean of per-batch |gradients|)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, mean_gradient


@dataclass
class GradConfig(MetricConfig):
    name: str = "grad"
    abs_per_batch: bool = False  # false: |mean gradient| (the study's); true: mean of per-batch |gradient|


@register("metric", "grad", schema=GradConfig, aliases=("gradient",))
class Grad(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        grads = mean_gradient(ctx, self.cfg.offload, self.cfg.abs_per_batch)
        return {name: g.abs_() for name, g in grads.items()}
