"""``pissa``: LoRA initialised from the principal singular vectors of each target weight (PiSSA),
through PEFT's ``init_lora_weights="pissa"`` (exact SVD) or ``"pissa_niter_<n>"`` (fast randomised
SVD with n subspace iterations, the released code's ``pissa_niter_4``); the residual stays in the
frozen weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from speft.config import check_positive
from speft.methods.lora import LoraMethodConfig, PeftAdapter
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
    quantized_refusal = ("PEFT's PiSSA initialisation takes the singular vectors of a float weight (QPiSSA, which "
                         "re-quantizes the residual, is not built)")

    @property
    def peft_options(self) -> dict:
        niter = self.cfg.svd_niter
        return {"init_lora_weights": "pissa" if niter is None else f"pissa_niter_{niter}"}
