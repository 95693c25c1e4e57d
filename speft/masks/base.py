"""Mask schedules: which entries are trainable at the start, and how that changes during training.

A schedule selects the initial mask from salience scores (:meth:`MaskSchedule.select`). Dynamic
schedules are then bound to the training run (:meth:`bind`) and called after every optimizer step
(:meth:`on_step_end`); they return a log record for each mask update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import MISSING
from torch import nn

from speft.config import Budget, check_choice
from speft.masks.selection import SELECTIONS, select
from speft.sparse.layer import VALUES_GROUP

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from speft.salience.scorer import Scorer


@dataclass
class MaskConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    selection: str = "global"  # global: one top-k over all targets; local: per module, counts by the budget form

    def __post_init__(self) -> None:
        check_choice("mask.selection", self.selection, sorted(SELECTIONS))


@dataclass
class MaskRuntime:
    """What a dynamic schedule needs during training."""

    model: nn.Module
    layers: dict  # target name -> SparseDeltaLinear
    optimizer: torch.optim.Optimizer
    total_steps: int
    entries: int  # trainable entries the mask keeps (the budget's count)
    scorer: Scorer  # the run's scorer (speft.salience.scorer)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # the initial mask, per module
    batches_per_epoch: int = 0  # micro-batches per epoch (0: unknown); mask=dynamic mode=released counts them
    grad_accum_steps: int = 1  # micro-batches per optimizer step

    def score(self, n: int | None) -> dict[str, torch.Tensor]:
        """Salience of every target entry at the current weights, on ``n`` fresh training examples
        (None: as many as the first scoring)."""
        return self.scorer.rescore(self.model, self.layers, n)

    def values_group(self) -> dict:
        return next(g for g in self.optimizer.param_groups if g.get("name") == VALUES_GROUP)


class MaskSchedule:
    dynamic = False
    quantized_refusal: Optional[str] = None  # why the mask cannot run on a quantized base (None: it can)

    def __init__(self, cfg: MaskConfig, budget: Budget | None = None) -> None:
        self.cfg = cfg
        self.runtime: MaskRuntime | None = None
        self.budget = budget  # the run's density (its form sets local per-module counts); None: a fraction

    def select(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        return select(self.cfg.selection, scores, k, self.budget)

    def bind(self, runtime: MaskRuntime) -> None:
        self.runtime = runtime
        runtime.initial = {n: layer.indices.long().clone() for n, layer in runtime.layers.items()}

    def on_step_end(self, step: int) -> dict | None:
        """Called after every optimizer step; may change the mask. Returns a log record or None."""
        return None

    def state_dict(self) -> dict:
        """The schedule's own state for a checkpoint: the initial mask (overlaps are measured against it).
        The current mask lives in the sparse layers and their counters in the step, both checkpointed
        apart; the re-scoring example stream is the scorer's (``Scorer.state_dict``)."""
        return {"initial": self.runtime.initial} if self.runtime is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.runtime is not None and "initial" in state:
            self.runtime.initial = {n: t.to(self.runtime.layers[n].indices.device) for n, t in state["initial"].items()}

    def overlap_with_initial(self) -> float:
        """Fraction of the current mask's entries that were in the initial mask."""
        rt = self.runtime
        kept = sum(int(torch.isin(layer.indices.long(), rt.initial[n]).sum()) for n, layer in rt.layers.items())
        return kept / max(1, sum(layer.indices.numel() for layer in rt.layers.values()))


def reset_adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, slots: torch.Tensor | None) -> None:
    """Zero the optimizer moments of ``param`` at ``slots`` (all of them when None)."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            if slots is None:
                state[key].zero_()
            else:
                state[key][slots] = 0


def warn_if_never_fires(name: str, interval: int, total: int, unit: str, last: int | None = None) -> bool:
    """Warn (before training) when a schedule's interval leaves no update inside the run: ``total`` is
    the run's length in ``unit``, ``last`` the latest count an update can happen at (total - 1: none
    after the last step)."""
    last = total - 1 if last is None else last
    if interval <= last:
        return False
    log.warning("mask=%s updates every %d %s but the run has %d: the mask never changes (the run is a "
                "static mask). Lower mask.update_every_steps below %d to see an update",
                name, interval, unit, total, last + 1)
    return True
