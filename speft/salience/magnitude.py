"""``magnitude``: |W|, the absolute value of each pretrained weight (no data, no gradient)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.models.quantization import dense_weight
from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext


@dataclass
class MagnitudeConfig(MetricConfig):
    name: str = "magnitude"
    cache: bool = False  # cheaper to compute than to read back; true saves them (e.g. for analysis)


@register("metric", "magnitude", schema=MagnitudeConfig)
class Magnitude(SalienceMetric):
    data_free = True

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        device = "cpu" if self.cfg.offload else None
        return {name: dense_weight(m).detach().to(device=device, dtype=torch.float32).abs()
                for name, m in ctx.targets.items()}
