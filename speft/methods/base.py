"""Methods: how a pretrained model is made trainable (sparse delta now; LoRA, PiSSA, full later)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from omegaconf import MISSING
from torch import nn

from speft.models.loading import head_parameters
from speft.train import checkpoint

if TYPE_CHECKING:
    from speft.config import Budget
    from speft.salience.scorer import Scorer


@dataclass
class MethodConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    targets: str = "attention"  # target preset of the model family (see speft/models/families.py)
    target_regex: Optional[list[str]] = None  # module-name regexes; override `targets` when set
    train_head: bool = True  # train a new task head too (counted apart); a causal LM's pretrained head stays frozen
    save_adapter: bool = True  # write the trained adapter to <run dir>/adapter (methods that have one)


@dataclass
class PrepareContext:
    """What a method needs to turn the loaded model into a trainable one."""

    model: nn.Module
    targets: dict[str, nn.Linear]
    family: str
    new_head: bool = True  # False: the head is pretrained (a causal LM's lm_head) and stays frozen
    entries: Optional[int] = None  # trainable entries in the target modules (salience methods)
    mask: Any = None  # MaskSchedule (salience methods)
    scorer: Optional[Scorer] = None  # salience scores (speft.salience.scorer); None for methods without salience
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A trainable model: its optimizer parameter groups and a summary of what trains."""

    param_groups: list[dict]
    trainable: dict[str, int]  # e.g. {"sparse": 147456, "head": 770}
    target_trainable: int = 0  # trainable entries attributable to the target modules (density's numerator)
    mask: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {"selected", "total"}


class Method:
    uses_salience = False  # True: the method scores, selects and uses the mask schedule
    uses_peft = False  # True: the method is built on Hugging Face PEFT (the memory estimate counts its import)
    head_only = False  # True: trains nothing but a new task head (refused for a pretrained LM head)
    quantized_refusal: Optional[str] = None  # why the method cannot train on a quantized base (None: it can)
    float_targets = False  # True: on a quantized base its target modules load unquantized (QPiSSA)

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def plan_budget(cfg: MethodConfig, budget: Budget, shapes: dict[str, tuple[int, int]]) -> int | None:
        """Pre-flight, from the target shapes alone: the trainable entries ``density`` gives this method on the
        target modules (it may set budget-derived keys of ``cfg``, e.g. LoRA's rank); None: ``density`` does
        not apply (full, head_only)."""
        return None

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path, **info) -> bool:
        """Save the trained adapter to ``folder``; False when the method has none (full, head_only)."""
        return False

    @staticmethod
    def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """A checkpoint's model part: what training changed (every trainable parameter by name) and the
        optimizer's parameter order; the frozen base is rebuilt by loading the model again."""
        return checkpoint.trainable_state(model, optimizer)

    @staticmethod
    def load_trainable_state(model: nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put :meth:`trainable_state` back into the prepared model (and the optimizer's groups)."""
        checkpoint.load_trainable_state(model, state, optimizer)

    def head_group(self, ctx: PrepareContext, head_lr: float) -> tuple[list[dict], int]:
        """Freeze or unfreeze the task head; its optimizer group (if trained) and parameter count."""
        if not ctx.new_head:
            return [], 0  # a pretrained head (causal LM) is part of the model: the method treats it as such
        params = list(head_parameters(ctx.model, ctx.family).values())
        for p in params:
            p.requires_grad_(self.cfg.train_head)
        if not self.cfg.train_head or not params:
            return [], 0
        return [{"params": params, "lr": head_lr, "name": "head"}], sum(p.numel() for p in params)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
