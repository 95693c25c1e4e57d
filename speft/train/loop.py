"""The training step's parts, which the recipe's loop (:class:`speft.recipe.Recipe`) calls: one micro-batch's
forward and backward, the optimizer step (gradient averaging, clipping, the non-finite check, AdamW and the
transformers schedule), the checkpoint clock, the loop's state and evaluation's forward pass.

Data-parallel (:mod:`speft.distributed`): each micro-batch is this rank's slice of the global one
(it carries :data:`~speft.distributed.SHARE`); its loss is weighted by the slice's share of the
micro-batch's loss items (examples, or labelled tokens for a causal LM), and the trainable gradients
are averaged over the ranks once per optimizer step, before clipping. Our own all-reduce rather than
DDP's: dynamic masks replace the sparse ``values`` parameters during training, which DDP registers
once at construction."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from speft.config import TrainerConfig
from speft.distributed import SHARE, SINGLE, Dist
from speft.train.checkpoint import StopRequest

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    history: list[dict] = field(default_factory=list)
    mask_updates: list[dict] = field(default_factory=list)
    # The position in the seeded data order: passes begun, micro-batches consumed in the current one,
    # and micro-batches since the start (an optimizer step may straddle the end of a pass).
    epoch_index: int = 0
    batch_in_epoch: int = 0
    micro: int = 0
    examples: int = 0  # training examples this process has run forward (its slices, when data-parallel)


@dataclass
class CheckpointClock:
    """When to checkpoint: every ``every_steps`` optimizer steps, every ``every_minutes``, and when ``stop`` caught
    a signal (the recipe then checkpoints and raises :class:`~speft.train.checkpoint.Interrupted`)."""

    every_steps: int | None = None
    every_minutes: float | None = None
    stop: StopRequest | None = None
    last_saved: float = field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self.last_saved >= 60 * self.every_minutes

    def decide(self, due: bool, dist: Dist) -> tuple[bool, int | None]:
        """Whether to checkpoint now, and the stop signal caught (None: go on). Data-parallel: every rank
        takes part in a checkpoint (a collective) and stops at the same step, so the ranks' wall clocks
        and signals are combined (any rank's reason counts)."""
        signum = self.stop.signum if self.stop is not None else None
        if not dist.enabled:
            return due, signum
        flags = torch.tensor([int(due), signum or 0], dtype=torch.int64)
        dist.all_reduce_([flags], op="max", host=True)  # host data: the gloo group under NCCL
        return bool(flags[0]), int(flags[1]) or None


def per_rank(loop: dict, dist: Dist) -> dict:
    """This rank's part of a checkpoint's loop state (random streams, running loss); pre-flight has
    checked that the checkpoint was written by as many processes."""
    return loop["ranks"][dist.rank] if loop.get("ranks") else loop


def total_steps(cfg: TrainerConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps == 0:
        return 0  # evaluate the model as loaded (zero-shot)
    return max(1, cfg.max_steps or math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum_steps))


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = move(batch, device)
        labels.append(batch.pop("labels").cpu())
        logits.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def use_fused(cfg: TrainerConfig, device: torch.device) -> bool:
    """``trainer.fused_adamw``, or by default fused on CUDA (the usual GPU choice) and not elsewhere."""
    return cfg.fused_adamw if cfg.fused_adamw is not None else device.type == "cuda"


class Diverged(RuntimeError):
    """The loss or the gradient became NaN or infinite: the run stops before the optimizer applies it."""


def check_finite(params: list[torch.Tensor], cfg: TrainerConfig, step: int, lr: float) -> None:
    """Clip the gradients to ``trainer.max_grad_norm`` (when set) and stop on a non-finite norm, before the
    step: training on NaN would run to the end and report the majority class as a result. One device sync
    per optimizer step (the norm), as clipping with ``error_if_nonfinite`` costs."""
    grads = [p.grad for p in params if p.grad is not None]
    if cfg.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if not torch.isfinite(norm):
        raise Diverged(f"the gradient norm is {float(norm)} at optimizer step {step} (learning rate {lr:.3g}): the "
                       f"loss or its gradient overflowed. Lower trainer.lr (now {cfg.lr:g})"
                       + ("" if cfg.max_grad_norm else " or clip gradients (trainer.max_grad_norm=1.0)")
                       + "; the last checkpoint before it, if any, is kept")


def set_tf32(cfg: TrainerConfig, device: torch.device) -> bool:
    """TF32 matmuls on CUDA per ``trainer.tf32`` (null: on for CUDA); returns whether they are on."""
    on = device.type == "cuda" and (cfg.tf32 if cfg.tf32 is not None else True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


def step_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """``optimizer.step()``. A fused AdamW updates its parameters without bumping their version counters, which
    modules that cache derived state read (the sparse layer re-merges its weight when ``values`` changed), so
    the step bumps them itself."""
    optimizer.step()
    if optimizer.defaults.get("fused"):
        torch.autograd.graph.increment_version(params)


def data_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator that fixes the loader's order (the sampler's, or the loader's own)."""
    return getattr(loader.sampler, "generator", None) or loader.generator


def forward_backward(model: nn.Module, batch: dict, cfg: TrainerConfig, device: torch.device,
                     dist: Dist = SINGLE) -> torch.Tensor | None:
    """One micro-batch's forward and backward, its gradient scaled for ``trainer.grad_accum_steps``; returns its
    contribution to the running loss (None: this rank's slice is empty). Data-parallel: this rank's slice (it
    carries :data:`~speft.distributed.SHARE`, popped here) weighs its loss by its share of the micro-batch's loss
    items, so the ranks' averaged gradient is the single-process one."""
    share = batch.pop(SHARE, None)
    if share is None:  # one process
        loss = model(**move(batch, device)).loss
        (loss / cfg.grad_accum_steps).backward()
        return loss.detach()  # no device sync per step; read out when logging
    if share > 0:
        loss = model(**move(batch, device)).loss
        (loss * (share * dist.world / cfg.grad_accum_steps)).backward()
        return loss.detach() * share
    return None


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainerConfig, step: int,
                   dist: Dist = SINGLE) -> None:
    """Optimizer step ``step`` (counted from 1) on the accumulated gradients: averaged over the ranks, clipped and
    checked (:func:`check_finite`), applied, the schedule advanced and the gradients cleared."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if dist.enabled:
        dist.average_gradients(params)
    check_finite(params, cfg, step, scheduler.get_last_lr()[0])
    step_optimizer(optimizer, params)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
