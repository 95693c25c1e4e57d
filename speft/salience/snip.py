"""``snip`` (alias ``saliency``, the released code's name): |W ⊙ ḡ|, connection sensitivity (SNIP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, mean_gradient, weight


@dataclass
class SnipConfig(MetricConfig):
    name: str = "snip"


@register("metric", "snip", schema=SnipConfig, aliases=("saliency",))
class Snip(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        grads = mean_gradient(ctx, self.cfg.offload)
        return {name: g.mul_(weight(ctx.targets[name], g)).abs_() for name, g in grads.items()}
