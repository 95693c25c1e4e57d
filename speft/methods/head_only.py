"""``head_only``: only the task head is trained (a linear probe: the floor any adapter must beat)."""

from __future__ import annotations

from dataclasses import dataclass

from speft.config import check
from speft.methods.base import Method, MethodConfig, PrepareContext, Prepared, freeze_all
from speft.registry import register


@dataclass
class HeadOnlyMethodConfig(MethodConfig):
    name: str = "head_only"

    def __post_init__(self) -> None:
        check(self.train_head, "method=head_only trains the head and nothing else: method.train_head must be true")


@register("method", "head_only", schema=HeadOnlyMethodConfig)
class HeadOnly(Method):
    head_only = True  # trains nothing but a new task head

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        freeze_all(ctx.model)
        head_groups, n_head = self.head_group(ctx, head_lr)
        return Prepared(param_groups=head_groups, trainable={"head": n_head}, target_trainable=0)
