"""``full``: full fine-tuning, every parameter of the model trained (the upper-cost reference)."""

from __future__ import annotations

from dataclasses import dataclass

from speft.methods.base import Method, MethodConfig, PrepareContext, Prepared
from speft.models.loading import head_parameters
from speft.models.quantization import weight_numel
from speft.registry import register


@dataclass
class FullMethodConfig(MethodConfig):
    name: str = "full"


@register("method", "full", schema=FullMethodConfig)
class Full(Method):
    quantized_refusal = "it trains the base weights themselves, and 4-/8-bit weights cannot be trained"

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        # A new task head trains apart (its own lr); a pretrained LM head is part of the body.
        head = set(map(id, head_parameters(ctx.model, ctx.family).values())) if ctx.new_head else set()
        body = [p for p in ctx.model.parameters() if id(p) not in head]
        for p in body:
            p.requires_grad_(True)
        head_groups, n_head = self.head_group(ctx, head_lr)
        target_entries = sum(weight_numel(m) for m in ctx.targets.values())
        return Prepared(param_groups=[{"params": body, "lr": lr, "name": "body"}, *head_groups],
                        trainable={"body": sum(p.numel() for p in body), "head": n_head},
                        target_trainable=target_entries)
