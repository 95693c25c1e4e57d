"""Mask schedules: which entries are trainable at the start, and how that changes during training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speft.config import check_choice
from speft.masks.selection import SELECTIONS


@dataclass
class MaskConfig:
    name: str = "???"  # the option's name, the same as its YAML file
    selection: str = "global"  # global: one top-k over all targets; local: the same density per module

    def __post_init__(self) -> None:
        check_choice("mask.selection", self.selection, sorted(SELECTIONS))


class MaskSchedule:
    def __init__(self, cfg: MaskConfig) -> None:
        self.cfg = cfg

    def select(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        return SELECTIONS[self.cfg.selection](scores, k)

    def on_step_end(self, step: int, state) -> dict | None:
        """Called after every optimizer step; may change the mask. Returns a log record or None."""
        return None
