"""``static``: the mask is chosen once, before training, and never changes."""

from __future__ import annotations

from dataclasses import dataclass

from speft.masks.base import MaskConfig, MaskSchedule
from speft.registry import register


@dataclass
class StaticMaskConfig(MaskConfig):
    name: str = "static"


@register("mask", "static", schema=StaticMaskConfig)
class StaticMask(MaskSchedule):
    pass
