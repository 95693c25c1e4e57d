"""``dora``: weight-decomposed LoRA (DoRA) through PEFT's ``use_dora=True``. It trains one magnitude
entry per output row on top of LoRA's r·(in+out), so its count is slightly above ``lora``'s."""

from __future__ import annotations

from dataclasses import dataclass

from speft.methods.lora import LoraMethodConfig, PeftAdapter
from speft.registry import register


@dataclass
class DoraMethodConfig(LoraMethodConfig):
    name: str = "dora"


@register("method", "dora", schema=DoraMethodConfig)
class Dora(PeftAdapter):
    peft_options = {"use_dora": True}
