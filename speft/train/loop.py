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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from speft.config import TrainerConfig
from speft.distributed import SHARE, SINGLE, Dist
from speft.train.checkpoint import (
    Interrupted,
    StopRequest,
    rng_state,
    set_rng_state,
    test_signal,
)

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
class Checkpointing:
    """When to checkpoint and how: ``save(loop_state, optimizer)`` writes the run's checkpoint (the pipeline adds
    the model's trainable state, the mask schedule's and the scorer's) and returns its path;
    ``resume`` is a loaded checkpoint to continue from, whose run-level parts ``restore(checkpoint,
    optimizer)`` puts back (it may swap parameters in the optimizer's groups)."""

    save: Callable[[dict, torch.optim.Optimizer], Path]
    every_steps: int | None = None
    every_minutes: float | None = None
    resume: dict | None = None
    restore: Callable[[dict, torch.optim.Optimizer], None] | None = None
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
    checkpointing: Checkpointing | None = None,
    dist: Dist = SINGLE,
) -> TrainState:
    """Train; ``on_start(optimizer, total_steps)`` runs once, ``on_step(step)`` after every optimizer
    step (mask schedules: it may swap parameters in the optimizer's groups) and may return a record.

    With ``checkpointing``, a checkpoint is written at optimizer-step boundaries when due, and when a
    stop signal arrived (then :class:`Interrupted` is raised); a ``resume`` checkpoint continues the run
    exactly: the data order is rebuilt from the generator state at the start of the interrupted pass,
    its consumed micro-batches are skipped (collated, not run), and the RNG states are set last."""
    from transformers import get_scheduler

    steps = total_steps(cfg, len(loader))
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=use_fused(cfg, device))
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    if on_start is not None:
        on_start(optimizer, steps)
    state = TrainState()
    signal_at = test_signal()
    ck = checkpointing
    resume = ck.resume if ck is not None else None
    running, n_running, epoch_rng, own = 0.0, 0, None, None
    if resume is not None:
        loop = resume["loop"]
        if ck.restore is not None:
            ck.restore(resume, optimizer)
        optimizer.load_state_dict(loop["optimizer"])
        scheduler.load_state_dict(loop["scheduler"])
        state = TrainState(**loop["train_state"])
        own = per_rank(loop, dist)  # this rank's random streams and running loss
        running, n_running, epoch_rng = own["running"], own["n_running"], loop["epoch_rng"]
        log.info("resumed at step %d (pass %d, micro-batch %d of it)", state.step, state.epoch_index,
                 state.batch_in_epoch)
    if steps == 0 or state.step >= steps:  # nothing (left) to train: a signal came at the last step
        if own is not None:
            set_rng_state(own["rng"])
        return state
    eval_every = cfg.eval_every_steps or max(1, len(loader) // cfg.grad_accum_steps)
    model.train()
    bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    t0 = time.perf_counter()
    gen = data_generator(loader)
    saved_at, saved_path = None, None

    def save() -> Path:
        nonlocal saved_at, saved_path
        # a Python number: a device tensor would come back on the CPU (map_location) and mix devices
        mine = {"running": float(running), "n_running": n_running, "rng": rng_state()}
        loop_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "train_state": asdict(state), "epoch_rng": epoch_rng, **mine,
                      # data-parallel: every rank's own (dropout streams differ), in rank order
                      "ranks": dist.all_gather_object(mine) if dist.enabled else None}
        path = ck.save(loop_state, optimizer)
        ck.last_saved, saved_at, saved_path = time.monotonic(), state.step, path
        return path

    while state.step < steps:
        if resume is None and gen is not None:
            epoch_rng = gen.get_state()  # a new pass: its order follows from this state
        elif gen is not None:
            gen.set_state(epoch_rng)
        batches = iter(loader)
        if resume is not None:
            for _ in range(state.batch_in_epoch):
                next(batches)
            set_rng_state(own["rng"])
            resume = None
        for batch in batches:
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
            state.micro += 1
            state.batch_in_epoch += 1
            if signal_at is not None and state.micro == signal_at[0]:  # the resume tests' real signal
                os.kill(os.getpid(), signal_at[1])
            if state.micro % cfg.grad_accum_steps:
                continue
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if dist.enabled:
                dist.average_gradients(params)
            check_finite(params, cfg, state.step + 1, scheduler.get_last_lr()[0])
            step_optimizer(optimizer, params)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch = state.micro / len(loader)
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
            if ck is not None:
                due, signum = ck.decide(state.step < steps and ck.due(state.step), dist)
                if due:
                    save()
                if signum is not None:
                    path = save() if saved_at != state.step else saved_path
                    bar.close()
                    raise Interrupted(signum, state.step, path)
            if state.step >= steps:
                break
        else:  # the pass is over
            state.epoch_index += 1
            state.batch_in_epoch = 0
    bar.close()
    return state
