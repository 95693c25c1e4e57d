"""``regrow``: RigL/SpIEL-style drop and grow. Every ``update_every_steps`` until ``end_fraction`` of
training, each module drops the fraction f(t) of its active entries with the smallest |value|
(f decays from ``drop_fraction`` to 0 by a cosine, as in RigL) and grows as many inactive entries
with the highest salience (the run's metric on ``num_score_examples`` fresh training examples, at the
current weights). Dropped entries return to the pretrained weight; grown ones start at zero with
fresh optimizer moments; survivors keep their values and Adam moments exactly. Each module keeps its
count, so the budget stays exact."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from speft.config import check, check_positive
from speft.masks.base import MaskConfig, MaskRuntime, MaskSchedule, reset_adam_state, warn_if_never_fires
from speft.registry import register


@dataclass
class RegrowMaskConfig(MaskConfig):
    name: str = "regrow"
    update_every_steps: int = 50  # optimizer steps between updates
    drop_fraction: float = 0.3  # initial fraction of each module's entries replaced (RigL's default)
    end_fraction: float = 0.75  # no updates in the last quarter of training (RigL's default)
    num_score_examples: Optional[int] = 128  # examples whose gradients rank the inactive entries; null = metric's

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "mask", "update_every_steps", "num_score_examples")
        check(0 < self.drop_fraction < 1, f"mask.drop_fraction={self.drop_fraction} must be in (0, 1)")
        check(0 < self.end_fraction <= 1, f"mask.end_fraction={self.end_fraction} must be in (0, 1]")


def drop_fraction_at(step: int, total_steps: int, cfg: RegrowMaskConfig) -> float:
    """Cosine decay from drop_fraction at step 0 to 0 at end_fraction of training."""
    end = cfg.end_fraction * total_steps
    return 0.0 if step > end else cfg.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))


@register("mask", "regrow", schema=RegrowMaskConfig)
class RegrowMask(MaskSchedule):
    dynamic = True

    def bind(self, runtime: MaskRuntime) -> None:
        super().bind(runtime)
        warn_if_never_fires(self.cfg.name, self.cfg.update_every_steps, runtime.total_steps, "optimizer steps")

    def on_step_end(self, step: int) -> dict | None:
        rt = self.runtime
        if step % self.cfg.update_every_steps or step >= rt.total_steps:
            return None
        fraction = drop_fraction_at(step, rt.total_steps, self.cfg)
        if fraction <= 0:
            return None
        t0 = time.perf_counter()
        scores = rt.score(self.cfg.num_score_examples)
        moved = 0
        for name, layer in rt.layers.items():
            n = round(fraction * layer.values.numel())
            if n == 0:
                continue
            drop = torch.sort(layer.values.detach().abs(), stable=True).indices[:n]
            keep = torch.ones(layer.values.numel(), dtype=torch.bool, device=drop.device)
            keep[drop] = False
            candidates = scores[name].reshape(-1).clone()
            candidates[layer.indices.long()[keep]] = -math.inf  # survivors cannot be grown again
            grow = torch.sort(candidates, descending=True, stable=True).indices[:n]
            layer.regrow(drop, grow)
            reset_adam_state(rt.optimizer, layer.values, drop)
            moved += n
        return {"step": step, "kind": "regrow", "drop_fraction": round(fraction, 6), "dropped": moved,
                "grown": moved, "overlap_initial": round(self.overlap_with_initial(), 6),
                "seconds": round(time.perf_counter() - t0, 3)}
