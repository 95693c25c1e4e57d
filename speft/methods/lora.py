"""``lora``: LoRA adapters (Hugging Face PEFT) on the same target modules as ``sparse``.

At rank r a module of shape (out, in) trains r·(in+out) parameters: exactly the count of the sparse
budget ``density=lora:<r>``. The rank comes from ``density`` (pre-flight: :meth:`PeftAdapter.plan_budget`),
so ``method=sparse`` and ``method=lora`` with the same ``density`` train the same number of entries; a
``method.rank`` that contradicts ``density`` is refused. ``pissa`` and ``dora`` reuse this module with
PEFT's options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from speft.config import Budget, check, check_positive
from speft.methods.base import Method, MethodConfig, PrepareContext, Prepared, freeze_all
from speft.models.quantization import quantized_layers
from speft.registry import ConfigError, register

log = logging.getLogger(__name__)


@dataclass
class LoraMethodConfig(MethodConfig):
    name: str = "lora"
    rank: Optional[int] = None  # null: from density (lora:r gives r; a count or fraction, the nearest rank)
    alpha: float = 8.0  # the study's α = r (scale α/r = 1)
    dropout: float = 0.05  # the study's LoRA dropout

    def __post_init__(self) -> None:
        check_positive(self, "method", "rank", "alpha")
        check(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")


class PeftAdapter(Method):
    """Shared by LoRA-family methods: wrap the targets with PEFT, then apply the head treatment."""

    peft_options: dict = {}
    uses_peft = True

    @staticmethod
    def plan_budget(cfg: LoraMethodConfig, budget: Budget, shapes: dict[str, tuple[int, int]]) -> int:
        """Set ``cfg.rank`` from the budget on the target shapes (a ``method.rank`` given apart must agree);
        returns the adapter's parameter count at that rank."""
        rank = budget.lora_rank(shapes)
        if cfg.rank is not None and cfg.rank != rank:
            raise ConfigError(f"method.rank={cfg.rank} contradicts density={budget} (LoRA rank {rank} on these "
                              f"targets): drop method.rank, or set density=lora:{cfg.rank}")
        cfg.rank = rank
        return rank * sum(o + i for o, i in shapes.values())

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        cfg = self.cfg
        freeze_all(ctx.model)
        if quantized_layers(ctx.model):
            # QLoRA: PEFT's k-bit preparation (the released code's too) keeps norms, embeddings and the head in fp32
            # beside the quantized layers; gradient checkpointing, when configured, is already on
            prepare_model_for_kbit_training(ctx.model, use_gradient_checkpointing=False)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=sorted(ctx.targets), **self.peft_options)
        # PEFT injects its layers into ctx.model in place; the wrapper is kept for saving.
        self.peft_model = get_peft_model(ctx.model, config)
        adapter = [p for n, p in ctx.model.named_parameters() if p.requires_grad]
        head_groups, n_head = self.head_group(ctx, head_lr)
        n_adapter = sum(p.numel() for p in adapter)
        log.info("%s: %d adapter parameters on %d modules, head %d", cfg.name, n_adapter, len(ctx.targets), n_head)
        return Prepared(param_groups=[{"params": adapter, "lr": lr, "name": "adapter"}, *head_groups],
                        trainable={"adapter": n_adapter, "head": n_head}, target_trainable=n_adapter)


    def save(self, model, folder, **info) -> bool:
        self.peft_model.save_pretrained(str(folder))
        return True


@register("method", "lora", schema=LoraMethodConfig)
class Lora(PeftAdapter):
    peft_options = {}
