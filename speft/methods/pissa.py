"""``pissa``: LoRA initialised from the principal singular vectors of each target weight (PiSSA),
through PEFT's ``init_lora_weights="pissa"`` (exact SVD) or ``"pissa_niter_<n>"`` (fast randomised
SVD with n subspace iterations, the released code's ``pissa_niter_4``); the residual stays in the
frozen weight.

On a quantized base (``model.quantization``) this is QPiSSA (PiSSA's paper, section 4.3): the target modules
load unquantized (:attr:`float_targets`), PEFT's initialisation takes the principal components of the
checkpoint's own weights, and the residual is then quantized as the rest of the base, so the frozen part is the
smaller residual; PEFT itself refuses PiSSA on a 4-bit weight. Until prepared, the targets hold float weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from speft.config import check_positive
from speft.methods.base import PrepareContext, Prepared
from speft.methods.lora import LoraMethodConfig, PeftAdapter
from speft.models.quantization import quantize_linear
from speft.registry import register


@dataclass
class PissaMethodConfig(LoraMethodConfig):
    name: str = "pissa"
    svd_niter: Optional[int] = None  # null: exact SVD; n: PEFT's fast SVD, pissa_niter_<n> (released code: 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "method", "svd_niter")


@register("method", "pissa", schema=PissaMethodConfig)
class Pissa(PeftAdapter):
    float_targets = True  # QPiSSA on a quantized base: the SVD of the checkpoint's float weights

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        config = getattr(ctx.model.config, "quantization_config", None)  # a quantized base: transformers' config
        prepared = super().prepare(ctx, lr, head_lr)
        if config is not None:  # QPiSSA: the residual quantized as the rest of the base
            for name in ctx.targets:
                wrapper = ctx.model.get_submodule(name)
                wrapper.base_layer = quantize_linear(wrapper.base_layer, config)
        return prepared

    @property
    def peft_options(self) -> dict:
        niter = self.cfg.svd_niter
        return {"init_lora_weights": "pissa" if niter is None else f"pissa_niter_{niter}"}
