"""The training loop: AdamW, a transformers schedule, gradient accumulation and clipping,
periodic validation, a progress bar, and mask-schedule hooks after every optimizer step.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from speft.config import TrainerConfig
from speft.distributed import SHARE, SINGLE, Dist

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    history: list[dict] = field(default_factory=list)
    mask_updates: list[dict] = field(default_factory=list)
    examples: int = 0  # training examples this process has run forward (its slices, when data-parallel)


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


def train(
    model: nn.Module,
    param_groups: list[dict],
    loader: DataLoader,
    cfg: TrainerConfig,
    device: torch.device,
    on_log: Callable[[dict, int], None],
    validate: Callable[[int], dict] | None = None,
    on_start: Callable[[torch.optim.Optimizer, int], None] | None = None,
    on_step: Callable[[int], dict | None] | None = None,
    dist: Dist = SINGLE,
) -> TrainState:
    """Train; ``on_start(optimizer, total_steps)`` runs once, ``on_step(step)`` after every optimizer
    step (mask schedules: it may swap parameters in the optimizer's groups) and may return a record."""
    from transformers import get_scheduler

    steps = total_steps(cfg, len(loader))
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    if on_start is not None:
        on_start(optimizer, steps)
    state = TrainState()
    if steps == 0:
        return state
    eval_every = cfg.eval_every_steps or max(1, len(loader) // cfg.grad_accum_steps)
    model.train()
    bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_main)
    running, n_running, t0 = 0.0, 0, time.perf_counter()
    micro = 0
    while state.step < steps:
        for batch in loader:
            share = batch.pop(SHARE, None)
            if share is None:  # one process
                loss = model(**move(batch, device)).loss
                (loss / cfg.grad_accum_steps).backward()
                running += loss.detach()  # no device sync per step; read out when logging
            elif share > 0:  # this rank's slice: its loss weighted by its share of the micro-batch
                loss = model(**move(batch, device)).loss
                (loss * (share * dist.world / cfg.grad_accum_steps)).backward()
                running += loss.detach() * share
            state.examples += len(next(iter(batch.values()))) if batch else 0
            n_running += 1
            micro += 1
            if micro % cfg.grad_accum_steps:
                continue
            if dist.enabled:
                dist.average_gradients([p for g in optimizer.param_groups for p in g["params"]])
            if cfg.max_grad_norm:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch = micro / len(loader)
            if on_step is not None:
                record = on_step(state.step)
                if record:
                    state.mask_updates.append(record)
                    on_log({f"mask/{k}": v for k, v in record.items() if k not in ("step", "kind")}, state.step)
            bar.update(1)
            if state.step % cfg.log_every_steps == 0 or state.step == steps:
                if dist.enabled:  # the mean over the ranks' slices
                    summed = torch.tensor([float(running)], dtype=torch.float64)
                    dist.all_reduce_([summed])
                    running = summed.item()
                record = {"train/loss": float(running) / n_running, "train/lr": scheduler.get_last_lr()[0],
                          "train/epoch": state.epoch,
                          "train/steps_per_s": cfg.log_every_steps / max(time.perf_counter() - t0, 1e-9)}
                bar.set_postfix(loss=f"{record['train/loss']:.4f}")
                on_log(record, state.step)
                running, n_running, t0 = 0.0, 0, time.perf_counter()
            if validate is not None and (state.step % eval_every == 0 or state.step == steps):
                metrics = validate(state.step)
                state.history.append({"step": state.step, "epoch": round(state.epoch, 4), **metrics})
                on_log(metrics, state.step)
            if state.step >= steps:
                break
    bar.close()
    return state
