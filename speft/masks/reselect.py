"""``reselect``: the study's dynamic mask with a short interval. Every ``update_every_steps``, merge the
learned values into the base weight, recompute salience on fresh training batches at the current
weights, select anew (global or local, the same budget), and restart the values at zero with fresh
optimizer state. ``mask=dynamic`` (:mod:`speft.masks.dynamic`) is the same schedule with the paper's
interval and sample size, plus the released code's variant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from speft.config import check_positive
from speft.masks.base import MaskConfig, MaskRuntime, MaskSchedule, warn_if_never_fires
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
    quantized_refusal = "it merges the learned delta into the base weight, which a 4-/8-bit weight cannot hold"

    def bind(self, runtime: MaskRuntime) -> None:
        super().bind(runtime)
        self.warn_unless_it_fires(runtime)

    def warn_unless_it_fires(self, runtime: MaskRuntime) -> None:
        """A warning when the schedule would never change the mask in this run (its interval too long)."""
        warn_if_never_fires(self.cfg.name, self.cfg.update_every_steps, runtime.total_steps, "optimizer steps")

    def restart(self, indices: dict[str, torch.Tensor]) -> int:
        """Merge every module's values into its base weight and train ``indices`` from zero with fresh
        optimizer moments. Returns how many of the new entries were already selected."""
        rt = self.runtime
        group = rt.values_group()
        kept = 0
        for name, layer in rt.layers.items():
            old = layer.values
            kept += int(torch.isin(indices[name].to(layer.indices.device), layer.indices.long()).sum())
            new = layer.reselect(indices[name])
            group["params"] = [new if p is old else p for p in group["params"]]
            rt.optimizer.state.pop(old, None)  # fresh moments for the new values
        return kept

    def on_step_end(self, step: int) -> dict | None:
        rt = self.runtime
        if step % self.cfg.update_every_steps or step >= rt.total_steps:
            return None
        t0 = time.perf_counter()
        scores = rt.score(self.cfg.num_score_examples)
        indices = self.select(scores, rt.entries)
        del scores
        kept = self.restart(indices)
        return {"step": step, "kind": "reselect", "kept": kept, "changed": rt.entries - kept,
                "overlap_initial": round(self.overlap_with_initial(), 6),
                "seconds": round(time.perf_counter() - t0, 3)}
