"""One run after pre-flight, as one recipe that owns it in the order it happens: set up (data, model, scorer,
method, mask), train, evaluate, save and load checkpoints, finish. The training loop calls the recipe's own
methods; nothing is handed to it as a callback. Pre-flight, the run's record and its outcome (completed,
interrupted, failed) are :mod:`speft.pipeline`'s; the training step's parts are :mod:`speft.train.loop`'s.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from speft import registry
from speft.distributed import Dist, DistributedError, ShardCollate, mask_digest
from speft.masks.base import MaskRuntime
from speft.methods.base import PrepareContext, count
from speft.models.loading import find_targets, head_parameters, load_model, load_tokenizer, target_patterns
from speft.models.quantization import weight_numel
from speft.registry import ConfigError
from speft.results import RunRecord, higher_is_better
from speft.salience.scorer import Scorer
from speft.sparse.layer import sparse_layers
from speft.train import checkpoint
from speft.train.checkpoint import Interrupted, StopRequest, rng_state, set_rng_state
from speft.train.loop import (
    CheckpointClock,
    TrainState,
    data_generator,
    forward_backward,
    optimizer_step,
    per_rank,
    predict,
    set_tf32,
    total_steps,
    use_fused,
)
from speft.utils import timed, write_jsonl

if TYPE_CHECKING:
    from speft.pipeline import Plan

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("index", "question", "target", "completion", "flexible", "flexible_correct")
MAX_LOGGED_PREDICTIONS = 200  # rows of the W&B predictions table (the whole file stays in the run folder)


class Recipe:
    """One run: :meth:`setup`, :meth:`train`, :meth:`finish` (:meth:`run` calls them in order). With several
    processes every rank runs it and rank 0 alone writes."""

    def __init__(self, plan: Plan, dist: Dist, run_dir: Path, logger, record: RunRecord, timings: dict[str, float],
                 stop: StopRequest) -> None:
        spec = plan.spec
        self.plan, self.spec, self.task, self.entries = plan, spec, plan.task, plan.entries
        self.dist, self.run_dir, self.logger, self.record, self.timings = dist, Path(run_dir), logger, record, timings
        self.method = registry.get("method", spec.method.name).obj(spec.method)
        self.metric = registry.get("metric", spec.metric.name).obj(spec.metric)
        self.mask = registry.get("mask", spec.mask.name).obj(spec.mask, spec.budget)  # local counts: its form
        self.device = dist.device(device_for(spec.trainer.device))
        self.clock = CheckpointClock(spec.trainer.checkpoint_every_steps, spec.trainer.checkpoint_every_minutes, stop)
        self.state = TrainState()
        self.running, self.n_running = 0.0, 0  # the training loss since the last log line
        self.epoch_rng = None  # the data order's generator state at the start of the current pass
        self.resumed_rng: dict | None = None  # this rank's random streams from the checkpoint resumed from
        self.saved_at: tuple[int, Path] | None = None  # the step and file of the latest checkpoint written
        self.throughput: dict[str, dict] = {}  # generation throughput per evaluated split (LM tasks)
        # set up by setup(): raw and tokenised rows per split, the model and its targets, the scorer, what trains
        self.splits: dict[str, list[dict]] = {}
        self.encoded: dict[str, list[dict]] = {}  # tokenised rows (train; the evaluation splits if not generative)
        self.tokenizer = self.model = self.collate = self.scorer = self.prepared = None
        self.targets: dict[str, torch.nn.Linear] = {}
        self.eval_loaders: dict[str, DataLoader] = {}
        self.eval_order: dict[str, list[int]] = {}  # per evaluation split: each batch position's row in the split
        self.periodic: list[str] = []  # the evaluation splits validated during training
        # set up by train(): the data order, the optimizer and schedule over `steps` optimizer steps
        self.loader = self.optimizer = self.scheduler = None
        self.steps = 0

    def run(self) -> tuple[dict[str, float], torch.nn.Module]:
        """The run's steps in order; returns the final metrics and the trained model."""
        self.setup()
        self.train()
        return self.finish(), self.model

    # ------------------------------------------------------------------------------------------
    # Set-up

    def setup(self) -> None:
        """Data and model loaded, the head warmed up (``trainer.head_warmup_steps``), salience scored and the mask
        selected by the method, which makes the model trainable."""
        from transformers import set_seed

        spec = self.spec
        if spec.trainer.num_threads:
            torch.set_num_threads(spec.trainer.num_threads)
        set_seed(spec.seed)
        self.record.update(tf32=set_tf32(spec.trainer, self.device))  # changes numerics: recorded
        self.load_data_and_model()
        if spec.trainer.head_warmup_steps:
            self.warm_up_head()
        self.scorer = self.build_scorer() if self.method.uses_salience else None
        self.make_trainable()
        self.check_same_mask()
        if self.prepared.mask:
            self.logger.log_table("mask", ["module", "selected", "total", "density"],
                                  [[n, m["selected"], m["total"], m["selected"] / m["total"]]
                                   for n, m in self.prepared.mask.items()])
        # Evaluation order does not change a metric: sorting by length keeps padding to a minimum. eval_order
        # maps each position back to the split's file order (the predictions files are in file order).
        self.eval_order = {name: sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
                           for name, rows in self.encoded.items() if name in self.task.eval_splits}
        self.eval_loaders = {name: DataLoader([self.encoded[name][i] for i in order],
                                              batch_size=self.task.cfg.eval_batch_size, collate_fn=self.collate)
                             for name, order in self.eval_order.items()}
        self.periodic = [s for s in self.eval_names() if s != "test"]  # validated during training; test at the end

    def load_data_and_model(self) -> None:
        spec, task = self.spec, self.task
        cache_dir = spec.paths.resolve("cache_dir")
        with timed(self.timings, "data_s"):
            self.splits = task.splits()  # raw rows per split
        with timed(self.timings, "model_load_s"):
            self.tokenizer = load_tokenizer(spec.model, cache_dir)
            keep_float = (target_patterns(spec.model.family, spec.method.targets, spec.method.target_regex)
                          if self.method.float_targets and spec.model.quantization != "none" else [])
            self.model = load_model(spec.model, task.head, task.num_labels, cache_dir, device=self.device,
                                    keep_float=keep_float)
        with timed(self.timings, "data_s"):
            # Generative tasks evaluate raw rows with their own evaluator; only training examples are encoded.
            self.encoded = {name: task.encode(self.tokenizer, rows)
                            for name, rows in self.splits.items() if name == "train" or not task.generative}
        self.collate = task.collator(self.tokenizer)
        if spec.trainer.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.targets = find_targets(self.model, spec.model.family, spec.method.targets, spec.method.target_regex)

    def warm_up_head(self) -> None:
        """Train the new task head alone for ``trainer.head_warmup_steps`` (AdamW at the head's learning rate, no
        schedule, its own seeded data order), so that salience is scored through a trained head. Every method
        then starts from this head; the body stays as loaded."""
        spec, model, steps = self.spec, self.model, self.spec.trainer.head_warmup_steps
        if not self.task.new_head:
            raise ConfigError(f"trainer.head_warmup_steps={steps}: task={spec.task.name} keeps its pretrained "
                              f"head; there is no new head to warm up")
        head = list(head_parameters(model, spec.model.family).values())
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, lr=spec.trainer.head_lr or spec.trainer.lr, weight_decay=0.0)
        loader = train_dataloader(self.encoded["train"], spec.trainer, self.collate, spec.seed + 1)
        was_training = model.training
        model.train()
        losses: list[float] = []
        with timed(self.timings, "head_warmup_s"):
            while len(losses) < steps:
                for _, batch in zip(range(steps - len(losses)), loader):  # the range first: no batch drawn past it
                    loss = model(**{k: v.to(self.device) for k, v in batch.items()}).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        self.record.update(head_warmup={"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]})
        log.info("head warm-up: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])

    def build_scorer(self) -> Scorer:
        """Scores come from a seeded sample of the training split (GraSP: two sets, metric.sample_factor)."""
        spec = self.spec
        return Scorer(self.metric, self.encoded["train"], self.collate, self.device,
                      batch_size=spec.metric.batch_size or spec.trainer.batch_size, seed=spec.seed,
                      cache_dir=spec.paths.resolve("cache_dir"),
                      key={"model": asdict(spec.model), "task": asdict(spec.task), "split": "train"}, dist=self.dist)

    def make_trainable(self) -> None:
        spec, k, scorer = self.spec, self.entries, self.scorer
        total_params = count(self.model.parameters())
        if spec.trainer.max_steps == 0 and self.method.uses_salience:
            log.info("trainer.max_steps=0: the sparse delta is selected but stays zero (the model as loaded)")
        ctx = PrepareContext(model=self.model, targets=self.targets, family=spec.model.family,
                             new_head=self.task.new_head, entries=k, mask=self.mask, scorer=scorer,
                             timings=self.timings)
        self.prepared = prepared = self.method.prepare(ctx, spec.trainer.lr, spec.trainer.head_lr or spec.trainer.lr)
        target_total = sum(o * i for o, i in self.plan.shapes.values())
        self.record.update(
            trainable_params=sum(prepared.trainable.values()), trainable=prepared.trainable,
            total_params=total_params, density=prepared.target_trainable / target_total, mask=prepared.mask,
            budget={"spec": str(spec.budget) if k is not None else None, "kind": spec.budget.kind,
                    "entries": k, "target_entries": target_total, "target_modules": len(self.plan.shapes)},
            num_score_examples=len(scorer.sample) if scorer else 0, scoring=scorer.info if scorer else {})

    def check_same_mask(self, step: int | None = None) -> None:
        """Data-parallel: every rank must train the same entries; a mismatch stops the run."""
        layers = sparse_layers(self.model)
        if self.dist.enabled and layers:
            when = "the initial selection" if step is None else f"the mask update after step {step}"
            self.dist.check_same(f"the sparse mask ({when})",
                                 mask_digest({n: m.indices for n, m in layers.items()}),
                                 "the ranks' scores differ (different data, weights or non-deterministic kernels)")

    # ------------------------------------------------------------------------------------------
    # Training

    def train(self) -> None:
        """Train; validate every epoch or ``eval_every_steps`` on every evaluation split but ``test`` (evaluated
        once at the end); a dynamic mask is bound to the optimizer and updated after every step. A resumed run
        continues exactly from its checkpoint."""
        spec = self.spec
        if self.dist.enabled:  # dropout: independent noise on each rank's slice (scoring streams keep their seeds)
            torch.manual_seed(spec.seed + 7919 * self.dist.rank)
        t0 = time.perf_counter()
        # Data-parallel: the single-process order of micro-batches; each rank collates its slice of each.
        collate = ShardCollate(self.collate, self.dist) if self.dist.enabled else self.collate
        self.loader = train_dataloader(self.encoded["train"], spec.trainer, collate, spec.seed)
        with self.clock.stop or StopRequest():
            self.build_optimizer()
            if self.mask.dynamic:
                self.mask.bind(MaskRuntime(self.model, sparse_layers(self.model), self.optimizer, self.steps,
                                           self.entries, self.scorer, batches_per_epoch=len(self.loader),
                                           grad_accum_steps=spec.trainer.grad_accum_steps))
            if self.plan.resume is not None:
                self.load_checkpoint(self.plan.resume["state"])
            self.loop()
        self.timings["training_s"] = time.perf_counter() - t0 - self.timings.get("evaluation_s", 0.0)
        if self.mask.dynamic:
            self.record.update(mask_final={n: {"selected": m.values.numel(), "total": weight_numel(m)}
                                           for n, m in sparse_layers(self.model).items()})
        self.record.update(history=self.state.history, mask_updates=self.state.mask_updates,
                           train_steps=self.state.step)
        if self.dist.enabled:  # how the examples were split
            self.record.data["processes"]["train_examples"] = self.dist.all_gather_object(self.state.examples)

    def build_optimizer(self) -> None:
        """AdamW over the method's parameter groups and the transformers schedule over the run's steps."""
        from transformers import get_scheduler

        cfg = self.spec.trainer
        self.steps = total_steps(cfg, len(self.loader))
        self.optimizer = torch.optim.AdamW(self.prepared.param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=use_fused(cfg, self.device))
        self.scheduler = get_scheduler(cfg.scheduler, self.optimizer, num_training_steps=self.steps,
                                       num_warmup_steps=round(cfg.warmup_ratio * self.steps))

    def loop(self) -> None:
        """Passes over the seeded data order until the last step. A resumed run rebuilds the interrupted pass's
        order from its generator state, skips its consumed micro-batches (collated, not run) and sets the
        random streams last."""
        if self.steps == 0 or self.state.step >= self.steps:  # nothing (left) to train: a signal at the last step
            if self.resumed_rng is not None:
                set_rng_state(self.resumed_rng)
            return
        cfg = self.spec.trainer
        self.eval_every = cfg.eval_every_steps or max(1, len(self.loader) // cfg.grad_accum_steps)
        self.model.train()
        self.bar = tqdm(total=self.steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.dist.is_main)
        self.t_logged = time.perf_counter()
        gen = data_generator(self.loader)
        while self.state.step < self.steps:
            if gen is not None and self.resumed_rng is None:
                self.epoch_rng = gen.get_state()  # a new pass: its order follows from this state
            elif gen is not None:
                gen.set_state(self.epoch_rng)
            batches = iter(self.loader)
            if self.resumed_rng is not None:
                for _ in range(self.state.batch_in_epoch):
                    next(batches)
                set_rng_state(self.resumed_rng)
                self.resumed_rng = None
            if self.train_pass(batches):
                break
            self.state.epoch_index += 1  # the pass is over
            self.state.batch_in_epoch = 0
        self.bar.close()

    def train_pass(self, batches) -> bool:
        """The rest of one pass; True when the last step is done."""
        for batch in batches:
            self.micro_batch(batch)
            if self.state.micro % self.spec.trainer.grad_accum_steps:
                continue
            optimizer_step(self.optimizer, self.scheduler, self.spec.trainer, self.state.step + 1, self.dist)
            self.state.step += 1
            self.state.epoch = self.state.micro / len(self.loader)
            self.after_step()
            if self.state.step >= self.steps:
                return True
        return False

    def micro_batch(self, batch: dict) -> None:
        loss = forward_backward(self.model, batch, self.spec.trainer, self.device, self.dist)
        if loss is not None:
            self.running += loss
        self.state.examples += len(next(iter(batch.values()))) if batch else 0
        self.n_running += 1
        self.state.micro += 1
        self.state.batch_in_epoch += 1

    def after_step(self) -> None:
        """After every optimizer step: the mask schedule, the log line, validation and checkpoints when due."""
        step, steps = self.state.step, self.steps
        if self.mask.dynamic:
            self.update_mask(step)
        self.bar.update(1)
        if step % self.spec.trainer.log_every_steps == 0 or step == steps:
            self.log_training()
        if self.periodic and (step % self.eval_every == 0 or step == steps):
            self.validate()
        due, signum = self.clock.decide(step < steps and self.clock.due(step), self.dist)
        if due:
            self.save_checkpoint()
        if signum is not None:
            path = self.save_checkpoint() if self.saved_at is None or self.saved_at[0] != step else self.saved_at[1]
            self.bar.close()
            raise Interrupted(signum, step, path)

    def update_mask(self, step: int) -> None:
        """A dynamic mask's update (it may swap parameters in the optimizer's groups), recorded and logged."""
        record = self.mask.on_step_end(step)
        if record:
            self.check_same_mask(step)
            self.state.mask_updates.append(record)
            self.logger.log({f"mask/{k}": v for k, v in record.items() if k not in ("step", "kind")}, step)

    def log_training(self) -> None:
        cfg = self.spec.trainer
        if self.dist.enabled:  # the mean over the ranks' slices
            summed = torch.tensor([float(self.running)], dtype=torch.float64)
            self.dist.all_reduce_([summed])
            self.running = summed.item()
        record = {"train/loss": float(self.running) / self.n_running, "train/lr": self.scheduler.get_last_lr()[0],
                  "train/epoch": self.state.epoch,
                  "train/steps_per_s": cfg.log_every_steps / max(time.perf_counter() - self.t_logged, 1e-9)}
        self.bar.set_postfix(loss=f"{record['train/loss']:.4f}")
        self.logger.log(record, self.state.step)
        self.running, self.n_running, self.t_logged = 0.0, 0, time.perf_counter()

    # ------------------------------------------------------------------------------------------
    # Evaluation

    def eval_names(self) -> list[str]:
        return [s for s in self.task.eval_splits if s in self.splits]

    def validate(self) -> None:
        metrics = {k: v for s in self.periodic for k, v in self.evaluate(s).items()}
        self.state.history.append({"step": self.state.step, "epoch": round(self.state.epoch, 4), **metrics})
        self.logger.log(metrics, self.state.step)

    def evaluate(self, split: str) -> dict[str, float]:
        """``{"<split>/<metric>": value}``. Evaluated once, on rank 0 (its predictions files too); the other ranks
        receive the numbers, or rank 0's error, rather than wait for it until the process group's timeout."""
        dist = self.dist
        if not dist.enabled:
            return self.evaluate_here(split)
        try:
            metrics = self.evaluate_here(split) if dist.is_main else None
        except Exception as e:
            dist.broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        status, value = dist.broadcast_object(("ok", metrics))
        if status == "error":
            raise DistributedError(f"rank 0 failed while evaluating '{split}': {value}")
        return value

    def evaluate_here(self, split: str) -> dict[str, float]:
        with timed(self.timings, "evaluation_s"):
            if self.task.generative:  # lm-evaluation-harness protocols (speft.evaluation)
                metrics, self.throughput[split] = self.task.evaluate(
                    split, self.model, self.tokenizer, self.splits[split], device=self.device, out_dir=self.run_dir)
            else:
                logits, labels = predict(self.model, self.eval_loaders[split], self.device)
                metrics = self.task.compute_metrics(logits, labels)
                # the latest evaluation's, per example: paired comparisons between runs (same split, same order)
                write_jsonl(self.run_dir / f"predictions_{split}.jsonl",
                            self.task.prediction_records(logits, labels, self.eval_order[split]))
            return {f"{split}/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> Path:
        """The loop's state (optimizer, schedule, position in the data order, every rank's random streams and
        running loss), the method's trainable state, the mask schedule's and the scorer's; rank 0 writes."""
        step = self.state.step
        # a Python number: a device tensor would come back on the CPU (map_location) and mix devices
        mine = {"running": float(self.running), "n_running": self.n_running, "rng": rng_state()}
        loop_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "train_state": asdict(self.state), "epoch_rng": self.epoch_rng, **mine,
                      # data-parallel: every rank's own (dropout streams differ), in rank order
                      "ranks": self.dist.all_gather_object(mine) if self.dist.enabled else None}
        path = checkpoint.path_of(self.run_dir, step)
        if self.dist.is_main:  # the ranks' own parts are gathered into its loop state
            content = {"loop": loop_state, "model": self.method.trainable_state(self.model, self.optimizer),
                       "mask": self.mask.state_dict(),
                       "scorer": self.scorer.state_dict() if self.scorer is not None else None}
            meta = {"logger_run_id": self.logger.run_id, "processes": self.dist.world,
                    "resumed_from_steps": self.record.data.get("resumed_from_steps", [])}
            path = checkpoint.save(self.run_dir, step, content, self.plan.config, self.spec.trainer.keep_checkpoints,
                                   meta=meta)
        self.clock.last_saved, self.saved_at = time.monotonic(), (step, path)
        return path

    def load_checkpoint(self, content: dict) -> None:
        """Put a checkpoint back into the prepared run (after the optimizer is built and the mask bound)."""
        self.method.load_trainable_state(self.model, content["model"], self.optimizer)
        self.mask.load_state_dict(content["mask"])
        if self.scorer is not None and content["scorer"] is not None:
            self.scorer.load_state_dict(content["scorer"])
        loop = content["loop"]
        self.optimizer.load_state_dict(loop["optimizer"])
        self.scheduler.load_state_dict(loop["scheduler"])
        self.state = TrainState(**loop["train_state"])
        own = per_rank(loop, self.dist)  # this rank's random streams and running loss
        self.running, self.n_running, self.epoch_rng = own["running"], own["n_running"], loop["epoch_rng"]
        self.resumed_rng = own["rng"]
        log.info("resumed at step %d (pass %d, micro-batch %d of it)", self.state.step, self.state.epoch_index,
                 self.state.batch_in_epoch)

    # ------------------------------------------------------------------------------------------
    # Finish

    def finish(self) -> dict[str, float]:
        """The adapter saved; the last validation, the test split and the best periodic evaluation recorded."""
        spec, history = self.spec, self.state.history
        if spec.method.save_adapter and self.dist.is_main:
            self.method.save(self.model, self.run_dir / "adapter", base_model=spec.model.name_or_path,
                             base_package=spec.model.package, targets=sorted(self.targets), metric=spec.metric.name,
                             mask=spec.mask.name, density=str(spec.budget))
        metrics = dict(history[-1]) if history else {}
        metrics.pop("step", None), metrics.pop("epoch", None)
        if "test" in self.eval_names():
            metrics.update(self.evaluate("test"))
        best = best_evaluation(history, self.task)
        self.logger.log({**metrics, **{f"best/{k}": v for k, v in best.items()}}, self.state.step)
        self.record.update(metrics=metrics, best_metrics=best)
        log.info("metrics: %s", metrics)
        if self.throughput:
            self.record.update(evaluation=self.throughput)
            log_evaluation(self.logger, self.run_dir, self.throughput, self.state.step)
        return metrics


def log_evaluation(logger, run_dir: Path, throughput: dict[str, dict], step: int) -> None:
    """LM tasks: the evaluation's throughput and a table of its first predictions, to the logger."""
    logger.log({f"{split}/{k}": v for split, figures in throughput.items() for k, v in figures.items()
                if isinstance(v, (int, float))}, step)
    for split in throughput:
        path = run_dir / f"predictions_{split}.jsonl"
        if not path.is_file():
            continue
        with path.open() as f:
            rows = [json.loads(line) for _, line in zip(range(MAX_LOGGED_PREDICTIONS), f)]
        if not rows:
            continue
        columns = [c for c in PREDICTION_COLUMNS if c in rows[0]] or sorted(rows[0])  # MMLU's own fields
        logger.log_table(f"predictions_{split}", columns, [[r.get(c) for c in columns] for r in rows])


def train_dataloader(rows: list[dict], tcfg, collate, seed: int) -> DataLoader:
    """Shuffled batches; with ``group_by_length``, batches of similar lengths (less padding)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if tcfg.group_by_length:
        sampler = LengthGroupedSampler(tcfg.batch_size, lengths=[len(r["input_ids"]) for r in rows], generator=g)
        return DataLoader(rows, batch_size=tcfg.batch_size, sampler=sampler, collate_fn=collate)
    return DataLoader(rows, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate, generator=g)


def best_evaluation(history: list[dict], task) -> dict:
    """The periodic evaluation with the best main validation metric (its step and epoch included)."""
    key = f"{task.validation_split}/{task.main_metric}"
    scored = [h for h in history if key in h and not math.isnan(h[key])]  # NaN: e.g. constant predictions
    sign = 1 if higher_is_better(key) else -1
    return dict(max(scored, key=lambda h: sign * h[key])) if scored else {}


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
