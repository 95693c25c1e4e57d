"""``random``: scores drawn uniformly from [0, 1), seeded by the run's seed (a baseline selection).

Targets are filled in their order from one CPU generator seeded with ``seed`` (the run's seed when
null), so the same seed gives the same scores on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from speft.models.quantization import weight_shape
from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext


@dataclass
class RandomConfig(MetricConfig):
    name: str = "random"
    cache: bool = False  # cheaper to compute than to read back; true saves them (e.g. for analysis)
    seed: Optional[int] = None  # null = the run's seed


@register("metric", "random", schema=RandomConfig)
class Random(SalienceMetric):
    data_free = True

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(ctx.seed if self.cfg.seed is None else self.cfg.seed)
        device = "cpu" if self.cfg.offload else None
        return {name: torch.rand(weight_shape(m), generator=g, dtype=torch.float32).to(device or m.weight.device)
                for name, m in ctx.targets.items()}
