"""``fisher`` (alias ``fisher_info``): the empirical diagonal Fisher information,
(1/N) Σ_i (∂ℓ_i/∂W)², the mean over examples of the squared per-example gradient.

Per-example gradients of the target linear layers come in closed form from one ordinary backward
pass per batch (see :func:`speft.salience._functional.squared_gradient_mean`); padded tokens do not
count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.registry import register
from speft.salience._functional import squared_gradient_mean
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext


@dataclass
class FisherConfig(MetricConfig):
    name: str = "fisher"


@register("metric", "fisher", schema=FisherConfig, aliases=("fisher_info",))
class Fisher(SalienceMetric):
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        return squared_gradient_mean(ctx, self.cfg.offload)
