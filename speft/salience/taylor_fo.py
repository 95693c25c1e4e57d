"""``taylor_fo`` (alias ``Taylor-FO``): (W ⊙ ḡ)², the squared first-order Taylor estimate of the loss
change when a weight is removed (Molchanov et al., 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, mean_gradient, weight


@dataclass
class TaylorFOConfig(MetricConfig):
    name: str = "taylor_fo"


@register("metric", "taylor_fo", schema=TaylorFOConfig, aliases=("Taylor-FO",))
class TaylorFO(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        grads = mean_gradient(ctx, self.cfg.offload)
        return {name: g.mul_(weight(ctx.targets[name], g)).square_() for name, g in grads.items()}
