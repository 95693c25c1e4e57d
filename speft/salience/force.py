"""``force`` (alias ``skeletonization``, the released code's name): −W ⊙ ḡ, signed (FORCE's
first-order estimate of the loss change when a weight moves).

Higher is more worth training, so the top-k keeps the most negative products W ⊙ ḡ: the entries
where a gradient step (−ḡ) moves the weight away from zero, i.e. grows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, mean_gradient, weight


@dataclass
class ForceConfig(MetricConfig):
    name: str = "force"


@register("metric", "force", schema=ForceConfig, aliases=("skeletonization",))
class Force(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        grads = mean_gradient(ctx, self.cfg.offload)
        return {name: g.mul_(weight(ctx.targets[name], g)).neg_() for name, g in grads.items()}
