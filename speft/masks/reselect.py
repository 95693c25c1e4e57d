"""``reselect``: the study's dynamic mask. Every ``update_every_steps``, merge the learned values into
the base weight, recompute salience on fresh training batches at the current weights, select anew
(global or local, the same budget), and restart the values at zero with fresh optimizer state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from speft.config import check_positive
from speft.masks.base import MaskConfig, MaskSchedule
from speft.registry import register


@dataclass
class ReselectMaskConfig(MaskConfig):
    name: str = "reselect"
    update_every_steps: int = 100  # optimizer steps between reselections
    num_score_examples: Optional[int] = None  # examples per re-scoring; null = metric.num_score_examples

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "mask", "update_every_steps", "num_score_examples")


@register("mask", "reselect", schema=ReselectMaskConfig)
class ReselectMask(MaskSchedule):
    dynamic = True

    def on_step_end(self, step: int) -> dict | None:
        rt = self.runtime
        if step % self.cfg.update_every_steps or step >= rt.total_steps:
            return None
        t0 = time.perf_counter()
        scores = rt.score(self.cfg.num_score_examples)
        indices = self.select(scores, rt.budget)
        del scores
        group = rt.values_group()
        kept = 0
        for name, layer in rt.layers.items():
            old = layer.values
            kept += int(torch.isin(indices[name].to(layer.indices.device), layer.indices.long()).sum())
            new = layer.reselect(indices[name])
            group["params"] = [new if p is old else p for p in group["params"]]
            rt.optimizer.state.pop(old, None)  # fresh moments for the new values
        return {"step": step, "kind": "reselect", "kept": kept, "changed": rt.budget - kept,
                "overlap_initial": round(self.overlap_with_initial(), 6),
                "seconds": round(time.perf_counter() - t0, 3)}
