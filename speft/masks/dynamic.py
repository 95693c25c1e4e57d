"""``dynamic``: the study's dynamic mask, in the paper's form or the released code's.

``mode=paper`` (default; the paper's description): every ``update_every_steps`` (1000) optimizer
steps, merge the learned values into the base weight, re-score at the current weights on
``num_score_examples`` (1024) fresh training examples, select anew with the same budget and
selection, and restart the values at zero with fresh optimizer state. It is :mod:`reselect` with the
paper's numbers (the machinery is the same class).

``mode=released`` (what the released code does, ``0-ml/speft``): every ``update_every_steps``-th
micro-batch, counted from the start of each epoch (the count restarts every epoch), merge the values
into the base weight, zero them and clear the optimizer's moments of the values. The scores come
back from the run-name cache written before training (``model/sparse_peft.py``,
``update_linear_sparse``: ``scores_path`` exists, so nothing is re-scored), so the mask never
changes. Here the update happens after the optimizer step that completes the counted micro-batch
(with gradient accumulation, the first step at or after it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from speft.config import check_choice
from speft.masks.base import MaskRuntime, warn_if_never_fires
from speft.masks.reselect import ReselectMask, ReselectMaskConfig
from speft.registry import register

MODES = ("paper", "released")


@dataclass
class DynamicMaskConfig(ReselectMaskConfig):
    name: str = "dynamic"
    update_every_steps: int = 1000  # the paper: re-estimate every 1000 steps (micro-batches with mode=released)
    num_score_examples: Optional[int] = 1024  # the paper: 1024 samples per re-estimation (mode=paper only)
    mode: str = "paper"  # paper: re-score and select anew; released: merge/zero/reset with the mask unchanged

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mask.mode", self.mode, MODES)


def micro_batches_in_epoch(step: int, runtime: MaskRuntime) -> tuple[int, int]:
    """Micro-batches of the current epoch done after optimizer step ``step`` and after the previous
    one (0 when the previous step was in an earlier epoch)."""
    accum, per_epoch = runtime.grad_accum_steps, runtime.batches_per_epoch
    done = step * accum
    if not per_epoch:
        return done, done - accum
    now = (done - 1) % per_epoch + 1
    return now, max(now - accum, 0)


@register("mask", "dynamic", schema=DynamicMaskConfig)
class DynamicMask(ReselectMask):
    dynamic = True

    def warn_unless_it_fires(self, runtime: MaskRuntime) -> None:
        if self.cfg.mode == "paper":
            return super().warn_unless_it_fires(runtime)
        micro = runtime.total_steps * runtime.grad_accum_steps
        reach = min(micro, runtime.batches_per_epoch) if runtime.batches_per_epoch else micro
        warn_if_never_fires("dynamic mask.mode=released", self.cfg.update_every_steps, reach,
                            "micro-batches of an epoch", last=reach)

    def on_step_end(self, step: int) -> dict | None:
        if self.cfg.mode == "paper":
            record = super().on_step_end(step)
            return record and {**record, "kind": "dynamic"}
        rt, n = self.runtime, self.cfg.update_every_steps
        now, before = micro_batches_in_epoch(step, rt)
        if now // n == before // n or step >= rt.total_steps:
            return None
        t0 = time.perf_counter()
        kept = self.restart({name: layer.indices.long() for name, layer in rt.layers.items()})
        return {"step": step, "kind": "merge_reset", "kept": kept, "changed": rt.entries - kept,
                "overlap_initial": round(self.overlap_with_initial(), 6),
                "seconds": round(time.perf_counter() - t0, 3)}
