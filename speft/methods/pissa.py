"""``pissa``: LoRA initialised from the principal singular vectors of each target weight (PiSSA),
through PEFT's ``init_lora_weights="pissa"``; the residual stays in the frozen weight."""

from __future__ import annotations

from dataclasses import dataclass

from speft.methods.lora import LoraMethodConfig, PeftAdapter
from speft.registry import register


@dataclass
class PissaMethodConfig(LoraMethodConfig):
    name: str = "pissa"


@register("method", "pissa", schema=PissaMethodConfig)
class Pissa(PeftAdapter):
    peft_options = {"init_lora_weights": "pissa"}
