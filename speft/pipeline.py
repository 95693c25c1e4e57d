"""One run: validate, plan the budget, load, score, select, train, evaluate, record.

Everything that can be checked without loading weights (the config, the target modules and the
budget, on a meta-device copy of the model) is checked before anything is loaded or written.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from speft import distributed, registry
from speft.config import Spec, validate
from speft.distributed import Dist, DistributedError, ShardCollate, mask_digest
from speft.loggers.base import RunLogger
from speft.masks.base import MaskRuntime
from speft.memory import MemoryEstimate
from speft.memory import estimate as estimate_memory
from speft.methods.base import PrepareContext, Prepared, count
from speft.models.loading import (
    build_meta_model,
    find_targets,
    head_parameters,
    load_model,
    load_tokenizer,
    target_patterns,
    target_shapes,
)
from speft.models.quantization import weight_numel
from speft.registry import ConfigError
from speft.results import RunRecord, completed_result, higher_is_better, read_result, write_json_atomic
from speft.salience.scorer import Scorer
from speft.sparse.layer import sparse_layers
from speft.train import checkpoint
from speft.train.checkpoint import Interrupted, StopRequest
from speft.train.loop import Checkpointing, predict, set_tf32, train
from speft.utils import timed

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What pre-flight established without loading weights: the validated config, the task, the target
    shapes, the exact budget, and a completed result to return instead of running (``skip_completed``)."""

    spec: Spec
    task: Any
    shapes: dict[str, tuple[int, int]]
    entries: int | None  # trainable entries `density` gives the target modules; None: full and head_only
    config: dict  # the resolved config, as results.json records it
    previous: dict | None = None
    resume: dict | None = None  # the latest checkpoint's record and content (``state``) to continue from
    memory: MemoryEstimate | None = None  # the peak per process, estimated on the meta model


def check_combination(spec: Spec, task) -> None:
    """Rules across config groups."""
    method_cls = registry.get("method", spec.method.name).obj
    mask_cls = registry.get("mask", spec.mask.name).obj
    if mask_cls.dynamic and not method_cls.uses_salience:
        raise ConfigError(f"mask={spec.mask.name} changes a sparse mask during training; method="
                          f"{spec.method.name} has none. Use mask=static or method=sparse")
    if not task.new_head and method_cls.head_only:
        raise ConfigError(f"method={spec.method.name} trains only a new task head; task={spec.task.name} keeps "
                          f"its pretrained LM head, so nothing would train. Use another method")
    training = spec.trainer.max_steps != 0
    if training and spec.model.dtype == "float16":
        raise ConfigError("model.dtype=float16 trains without a loss scaler here, so small gradients underflow to "
                          "zero; use model.dtype=bfloat16 (same memory, fp32's range) or float32")
    if training and spec.method.name == "full" and spec.model.dtype != "float32":
        raise ConfigError(f"method=full with model.dtype={spec.model.dtype}: AdamW would update the "
                          f"{spec.model.dtype} weights in place, where updates smaller than the weight's last bit "
                          f"round away; use model.dtype=float32 for full fine-tuning")
    check_quantized_base(spec, method_cls, mask_cls)
    check_world(spec, distributed.world_size_from_env())


def check_quantized_base(spec: Spec, method_cls, mask_cls) -> None:
    """A quantized base trains only with the methods and masks that can run on it (each says why it cannot; every
    metric can)."""
    if spec.model.quantization == "none":
        return
    parts = [("method", method_cls)] + ([("mask", mask_cls)] if method_cls.uses_salience else [])
    for group, cls in parts:
        if cls.quantized_refusal is not None:
            name = getattr(spec, group).name
            ok = [n for n in registry.names(group) if registry.get(group, n).obj.quantized_refusal is None]
            raise ConfigError(f"{group}={name} cannot run on model.quantization={spec.model.quantization}: "
                              f"{cls.quantized_refusal}. Valid choices on a quantized base: {', '.join(ok)} "
                              f"(or model.quantization=none)")


def check_world(spec: Spec, world: int) -> None:
    """Data-parallel: each of the ``world`` processes takes an equal slice of every micro-batch."""
    b = spec.trainer.batch_size
    if world > 1 and b % world:
        ok = [m * world for m in range(max(1, b // world), b // world + 3)]
        raise ConfigError(f"trainer.batch_size={b} (examples per micro-batch over all processes) does not split "
                          f"over {world} processes; use a multiple of {world}, e.g. "
                          f"{', '.join(map(str, ok))} (with trainer.grad_accum_steps to keep the global batch)")


def plan_budget(spec: Spec, meta) -> tuple[dict[str, tuple[int, int]], int | None]:
    """Target shapes and the exact number of trainable entries ``density`` gives the method (None for full and
    head_only), from the model's structure alone (a meta-device copy); LoRA's rank is set from it."""
    shapes = target_shapes(find_targets(meta, spec.model.family, spec.method.targets, spec.method.target_regex))
    return shapes, registry.get("method", spec.method.name).obj.plan_budget(spec.method, spec.budget, shapes)


def plan_memory(spec: Spec, task, meta, shapes: dict[str, tuple[int, int]], k: int | None) -> MemoryEstimate | None:
    """The run's peak memory per process, estimated from the same meta-device copy (None, with a warning, for a
    model config the estimate cannot read: the run goes on without one)."""
    head = head_parameters(meta, spec.model.family) if task.new_head and spec.method.train_head else {}
    try:
        return estimate_memory(meta, spec, shapes, k, device=device_for(spec.trainer.device).type,
                               world_size=distributed.world_size_from_env(), causal_lm=task.head == "causal_lm",
                               head_params=sum(p.numel() for p in head.values()))
    except ValueError as e:
        log.warning("no memory estimate for model=%s: %s", spec.model.name, e)
        return None


def preflight(cfg: DictConfig, run_dir: Path) -> Plan:
    """Everything checked before weights are loaded or anything is written: values, cross-group rules,
    targets and budget on the meta model, and the completed-result rule. Raises :class:`ConfigError`."""
    spec = validate(cfg)
    task = registry.get("task", spec.task.name).obj(spec.task, spec.paths.resolve("data_dir"))
    check_combination(spec, task)
    meta = build_meta_model(spec.model, task.head, task.num_labels, spec.paths.resolve("cache_dir"))
    shapes, k = plan_budget(spec, meta)
    memory = plan_memory(spec, task, meta, shapes, k)
    config = spec.resolved()
    config["method"].update({key: value for key, value in asdict(spec.method).items()
                             if key in config["method"]})  # what pre-flight derived (LoRA's rank from density)
    previous = reusable_result(Path(run_dir), config, spec.skip_completed)
    resume = None if previous is not None else checkpoint.resumable(Path(run_dir), config, spec.resume,
                                                                    distributed.world_size_from_env())
    if resume is not None:
        resume["state"] = checkpoint.load(resume["path"])
    return Plan(spec, task, shapes, k, config, previous, resume, memory)


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


def run(cfg: DictConfig, run_dir: Path, run_name: str = "run", sweep_dir: str | None = None,
        plan: Plan | None = None) -> RunResult:
    """One run in ``run_dir``. ``plan``: the pre-flight of this config already done (the CLI's callback);
    a run that fails pre-flight records a failed results.json there (never over a completed one)."""
    t_start = time.perf_counter()
    try:
        plan = plan or preflight(cfg, run_dir)
    except Exception as e:
        if distributed.env_rank() == 0:
            record_refusal(cfg, Path(run_dir), e)
        raise
    if plan.memory is not None and distributed.env_rank() == 0:
        for line in plan.memory.lines():
            log.info(line)
    if plan.spec.dry_run:  # pre-flight only: nothing loaded, nothing written
        estimate = plan.memory.record() if plan.memory is not None else None
        return RunResult(metrics={}, results={"dry_run": True, "memory_estimate_mb": estimate}, model=None)
    dist = distributed.init(device_for(plan.spec.trainer.device))
    try:
        return _run(plan, dist, Path(run_dir), run_name, sweep_dir, t_start)
    finally:
        distributed.shutdown()


def _run(plan: Plan, dist: Dist, run_dir: Path, run_name: str, sweep_dir: str | None, t_start: float) -> RunResult:
    """The run after pre-flight; with several processes every rank runs it, rank 0 alone writes."""
    spec, task = plan.spec, plan.task
    run_dir, previous = dist.broadcast_object((run_dir, plan.previous))  # Hydra's ${now} may differ per rank
    if previous is not None:
        source = previous.get("reused_from", run_dir)
        log.info("%s holds a completed result of this config; skipped (skip_completed=true)", source)
        if "reused_from" in previous and dist.is_main:  # this job's own folder says where its result is
            write_json_atomic(Path(run_dir) / "reused.json", {"results": str(Path(source) / "results.json")})
        return RunResult(metrics=previous["metrics"], results=previous, model=None)

    # Only rank 0 writes results.json and logs to W&B; the other ranks keep a record in memory.
    logger = registry.get("logger", spec.logger.name).obj(spec.logger) if dist.is_main else RunLogger(spec.logger)
    record = RunRecord(run_dir, plan.config, spec.seed, write=dist.is_main)
    record.update(main_metric=f"{task.validation_split}/{task.main_metric}",
                  salience=registry.get("method", spec.method.name).obj.uses_salience,
                  processes={"world_size": dist.world, "backend": dist.backend})
    resumed = [*plan.resume.get("resumed_from_steps", []), plan.resume["step"]] if plan.resume else []
    record.update(resumed=len(resumed), resumed_from_steps=resumed)
    if plan.memory is not None:
        record.update(memory_estimate_mb=plan.memory.record())
    if plan.resume:
        log.info("resuming from %s (step %d; resume number %d)", plan.resume["path"], plan.resume["step"], len(resumed))
    timings: dict[str, float] = {}
    stop = StopRequest()
    try:
        distributed.check_same_config(dist, plan.config)  # a mismatch: a failed result, never a result
        dist.check_same("the checkpoint to resume from", str(plan.resume["path"] if plan.resume else None),
                        "give every process the same hydra.run.dir")
        logger.start(plan.config, run_dir, run_name, sweep_dir,
                     resume_id=plan.resume.get("logger_run_id") if plan.resume else None)
        metrics, model = _execute(plan, Path(run_dir), logger, record, timings, stop, dist)
        timings["total_s"] = time.perf_counter() - t_start
        record.update(timings={k: round(v, 3) for k, v in timings.items()})
        data = record.finish("completed")
        if dist.is_main:
            checkpoint.remove_all(Path(run_dir))  # the result is final: checkpoints are no longer needed
        logger.finish(data)
        return RunResult(metrics=metrics, results=data, model=model)
    except Interrupted as e:  # a checkpoint is written: rerunning the same command resumes
        timings["total_s"] = time.perf_counter() - t_start
        record.update(timings={k: round(v, 3) for k, v in timings.items()}, interrupted=e.record())
        data = record.finish("interrupted")
        logger.finish(data)
        log.warning("%s; run the same command into %s to resume", e, run_dir)
        stop.chain()  # under submitit: its handler requeues the job (and exits)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): stopped at once, no new checkpoint
        timings["total_s"] = time.perf_counter() - t_start
        latest = checkpoint.checkpoints(run_dir)
        record.update(timings={k: round(v, 3) for k, v in timings.items()},
                      interrupted={"signal": "SIGINT", "step": None,
                                   "checkpoint": str(latest[-1][1].with_suffix(".pt")) if latest else None})
        data = record.finish("interrupted")
        logger.finish(data)
        log.warning("stopped by Ctrl-C; rerun the same command into %s to %s", run_dir,
                    "resume from its latest checkpoint" if latest else "start again")
        raise
    except BaseException as e:  # record the failure, then let it propagate
        timings["total_s"] = time.perf_counter() - t_start
        record.update(timings={k: round(v, 3) for k, v in timings.items()})
        data = record.finish("failed", e)
        try:
            logger.finish(data)
        except Exception:  # noqa: BLE001 - the original error matters more
            log.exception("logger failed while finishing")
        raise


def record_refusal(cfg: DictConfig, run_dir: Path, error: BaseException) -> None:
    """A failed results.json for a run refused by pre-flight (a sweep's report then shows it), unless
    the folder holds a completed result, which is never overwritten."""
    if completed_result(run_dir):
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an unresolvable value: record it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)
    record = RunRecord(run_dir, config, cfg.get("seed"))
    try:  # whether metric and mask settings matter, for the report (unknown when the method name is bad)
        record.update(salience=registry.get("method", cfg.method.name).obj.uses_salience)
    except Exception:  # noqa: BLE001
        pass
    record.finish("failed", error)


def reusable_result(run_dir: Path, config: dict, skip_completed: bool) -> dict | None:
    """A completed result already in ``run_dir``: returned when ``skip_completed`` and its config is
    this one; otherwise an error, since running would overwrite it. None when there is none."""
    previous = read_result(run_dir)
    if previous is None or previous.get("status") != "completed":  # nothing there, or a failed or interrupted run
        return completed_twin(run_dir, config) if skip_completed else None
    if not skip_completed:
        raise ConfigError(f"{run_dir} already holds a completed results.json; add skip_completed=true to return "
                          f"it if this is the same config, or choose another output folder")
    old = previous.get("config") or {}
    changed = checkpoint.differing_keys(old, config)  # settings that do not change what a run computes left out
    if changed:
        raise ConfigError(f"{run_dir} holds a completed result of a different config (differs in: "
                          f"{', '.join(changed)}); it is kept. Re-launch the sweep with the same overrides "
                          f"or choose another hydra.sweep.dir")
    return previous


def completed_twin(run_dir: Path, config: dict) -> dict | None:
    """In a sweep folder (one holding ``multirun.yaml``): a completed result of this very config in another job
    folder, e.g. an earlier launch's (``reused_from`` names it). None elsewhere or when there is none."""
    sweep = Path(run_dir).parent
    if not (sweep / "multirun.yaml").is_file():
        return None
    for other in sorted(p for p in sweep.iterdir() if p.is_dir() and p != Path(run_dir)):
        found = read_result(other)
        if (found is not None and found.get("status") == "completed"
                and not checkpoint.differing_keys(found.get("config") or {}, config)):
            return {**found, "reused_from": str(other)}
    return None


@dataclass
class RunResult:
    metrics: dict[str, float]
    results: dict  # the content of results.json
    model: torch.nn.Module | None  # the fine-tuned model, sparse layers in place (None: a skipped run)


@dataclass
class RunState:
    """What the steps of one run share: the loaded data and model, and where results go."""

    spec: Spec
    task: Any
    run_dir: Path
    record: RunRecord
    timings: dict[str, float]
    device: torch.device
    config: dict = field(default_factory=dict)  # the resolved config (checkpoints record it)
    resume: dict | None = None  # the checkpoint to continue from (Plan.resume)
    stop: StopRequest | None = None
    logger: Any = None
    splits: dict[str, list[dict]] = field(default_factory=dict)  # raw rows per split
    encoded: dict[str, list[dict]] = field(default_factory=dict)  # tokenised rows (train; eval if not generative)
    tokenizer: Any = None
    model: torch.nn.Module | None = None
    collate: Any = None
    targets: dict[str, torch.nn.Linear] = field(default_factory=dict)
    dist: Dist = distributed.SINGLE  # this process's rank in a data-parallel run


def _execute(plan: Plan, run_dir: Path, logger, record: RunRecord, timings: dict[str, float],
             stop: StopRequest | None = None, dist: Dist = distributed.SINGLE):
    """The run's steps, in order; returns the final metrics and the trained model."""
    from transformers import set_seed

    spec, k = plan.spec, plan.entries
    method, metric = (registry.get(g, getattr(spec, g).name).obj(getattr(spec, g)) for g in ("method", "metric"))
    mask = registry.get("mask", spec.mask.name).obj(spec.mask, spec.budget)  # local counts follow its form
    if spec.trainer.num_threads:
        torch.set_num_threads(spec.trainer.num_threads)
    set_seed(spec.seed)
    state = RunState(spec, plan.task, run_dir, record, timings, dist.device(device_for(spec.trainer.device)),
                     config=plan.config, resume=plan.resume, stop=stop, logger=logger, dist=dist)
    record.update(tf32=set_tf32(spec.trainer, state.device))  # changes numerics: recorded
    load_data_and_model(state)
    if spec.trainer.head_warmup_steps:
        warm_up_head(state)
    scorer = build_scorer(state, metric) if method.uses_salience else None
    prepared = make_trainable(state, method, mask, scorer, k, plan.shapes)
    check_same_mask(state)
    if prepared.mask:
        logger.log_table("mask", ["module", "selected", "total", "density"],
                         [[n, m["selected"], m["total"], m["selected"] / m["total"]] for n, m in prepared.mask.items()])
    evaluate, throughput = evaluator(state)
    history = train_and_validate(state, prepared, mask, scorer, k, logger, evaluate)
    if spec.method.save_adapter and state.dist.is_main:
        method.save(state.model, state.run_dir / "adapter", base_model=spec.model.name_or_path,
                    base_package=spec.model.package, targets=sorted(state.targets), metric=spec.metric.name,
                    mask=spec.mask.name, density=str(spec.budget))
    metrics = final_metrics(state, history, evaluate, logger)
    if throughput:
        record.update(evaluation=throughput)
        log_evaluation(state, throughput, history.step)
    return metrics, state.model


PREDICTION_COLUMNS = ("index", "question", "target", "completion", "flexible", "flexible_correct")
MAX_LOGGED_PREDICTIONS = 200  # rows of the W&B predictions table (the whole file stays in the run folder)


def log_evaluation(state: RunState, throughput: dict[str, dict], step: int) -> None:
    """LM tasks: the evaluation's throughput and a table of its first predictions, to the logger."""
    import json

    state.logger.log({f"{split}/{k}": v for split, figures in throughput.items() for k, v in figures.items()
                      if isinstance(v, (int, float))}, step)
    for split in throughput:
        path = state.run_dir / f"predictions_{split}.jsonl"
        if not path.is_file():
            continue
        with path.open() as f:
            rows = [json.loads(line) for _, line in zip(range(MAX_LOGGED_PREDICTIONS), f)]
        if not rows:
            continue
        columns = [c for c in PREDICTION_COLUMNS if c in rows[0]] or sorted(rows[0])  # MMLU's own fields
        state.logger.log_table(f"predictions_{split}", columns, [[r.get(c) for c in columns] for r in rows])


def load_data_and_model(state: RunState) -> None:
    spec, task = state.spec, state.task
    cache_dir = spec.paths.resolve("cache_dir")
    with timed(state.timings, "data_s"):
        state.splits = task.splits()
    with timed(state.timings, "model_load_s"):
        state.tokenizer = load_tokenizer(spec.model, cache_dir)
        method = registry.get("method", spec.method.name).obj
        keep_float = (target_patterns(spec.model.family, spec.method.targets, spec.method.target_regex)
                      if method.float_targets and spec.model.quantization != "none" else [])
        state.model = load_model(spec.model, task.head, task.num_labels, cache_dir, device=state.device,
                                 keep_float=keep_float)
    with timed(state.timings, "data_s"):
        # Generative tasks evaluate raw rows with their own evaluator; only training examples are encoded.
        state.encoded = {name: task.encode(state.tokenizer, rows)
                         for name, rows in state.splits.items() if name == "train" or not task.generative}
    state.collate = task.collator(state.tokenizer)
    if spec.trainer.gradient_checkpointing:
        state.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    state.targets = find_targets(state.model, spec.model.family, spec.method.targets, spec.method.target_regex)


def warm_up_head(state: RunState) -> None:
    """Train the new task head alone for ``trainer.head_warmup_steps`` (AdamW at the head's learning rate, no
    schedule, its own seeded data order), so that salience is scored through a trained head. Every method
    then starts from this head; the body stays as loaded."""
    spec, model = state.spec, state.model
    if not state.task.new_head:
        raise ConfigError(f"trainer.head_warmup_steps={spec.trainer.head_warmup_steps}: task={spec.task.name} "
                          f"keeps its pretrained head; there is no new head to warm up")
    head = list(head_parameters(model, spec.model.family).values())
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(head, lr=spec.trainer.head_lr or spec.trainer.lr, weight_decay=0.0)
    loader = train_dataloader(state.encoded["train"], spec.trainer, state.collate, spec.seed + 1)
    was_training = model.training
    model.train()
    step, losses = 0, []
    with timed(state.timings, "head_warmup_s"):
        while step < spec.trainer.head_warmup_steps:
            for batch in loader:
                loss = model(**{k: v.to(state.device) for k, v in batch.items()}).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step == spec.trainer.head_warmup_steps:
                    break
    model.train(was_training)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    state.record.update(head_warmup={"steps": step, "loss_first": losses[0], "loss_last": losses[-1]})
    log.info("head warm-up: %d steps, loss %.4f -> %.4f", step, losses[0], losses[-1])


def build_scorer(state: RunState, metric) -> Scorer:
    """Scores come from a seeded sample of the training split (GraSP: two sets, metric.sample_factor)."""
    spec = state.spec
    return Scorer(metric, state.encoded["train"], state.collate, state.device,
                  batch_size=spec.metric.batch_size or spec.trainer.batch_size, seed=spec.seed,
                  cache_dir=spec.paths.resolve("cache_dir"),
                  key={"model": asdict(spec.model), "task": asdict(spec.task), "split": "train"}, dist=state.dist)


def check_same_mask(state: RunState, step: int | None = None) -> None:
    """Data-parallel: every rank must train the same entries; a mismatch stops the run."""
    layers = sparse_layers(state.model)
    if state.dist.enabled and layers:
        when = "the initial selection" if step is None else f"the mask update after step {step}"
        state.dist.check_same(f"the sparse mask ({when})", mask_digest({n: m.indices for n, m in layers.items()}),
                              "the ranks' scores differ (different data, weights or non-deterministic kernels)")


def make_trainable(state: RunState, method, mask, scorer: Scorer | None, k, shapes) -> Prepared:
    spec = state.spec
    total_params = count(state.model.parameters())
    if spec.trainer.max_steps == 0 and method.uses_salience:
        log.info("trainer.max_steps=0: the sparse delta is selected but stays zero (the model as loaded)")
    ctx = PrepareContext(model=state.model, targets=state.targets, family=spec.model.family,
                         new_head=state.task.new_head, entries=k, mask=mask, scorer=scorer, timings=state.timings)
    prepared = method.prepare(ctx, spec.trainer.lr, spec.trainer.head_lr or spec.trainer.lr)
    target_total = sum(o * i for o, i in shapes.values())
    state.record.update(
        trainable_params=sum(prepared.trainable.values()), trainable=prepared.trainable, total_params=total_params,
        density=prepared.target_trainable / target_total, mask=prepared.mask,
        budget={"spec": str(spec.budget) if k is not None else None, "kind": spec.budget.kind,
                "entries": k, "target_entries": target_total, "target_modules": len(shapes)},
        num_score_examples=len(scorer.sample) if scorer else 0, scoring=scorer.info if scorer else {})
    return prepared


def evaluator(state: RunState):
    """``evaluate(split) -> {"<split>/<metric>": value}`` and the generation throughput it records."""
    task = state.task
    # Evaluation order does not change a metric: sorting by length keeps padding to a minimum.
    by_length = lambda rows: sorted(rows, key=lambda r: len(r["input_ids"]))  # noqa: E731
    loaders = {name: DataLoader(by_length(rows), batch_size=task.cfg.eval_batch_size, shuffle=False,
                                collate_fn=state.collate)
               for name, rows in state.encoded.items() if name in task.eval_splits}
    throughput: dict[str, dict] = {}

    def evaluate(split: str) -> dict[str, float]:
        """Evaluated once, on rank 0 (its predictions files too); the other ranks receive the numbers,
        or rank 0's error, rather than wait for it until the process group's timeout."""
        dist = state.dist
        if not dist.enabled:
            return evaluate_here(split)
        try:
            metrics = evaluate_here(split) if dist.is_main else None
        except Exception as e:
            dist.broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        status, value = dist.broadcast_object(("ok", metrics))
        if status == "error":
            raise DistributedError(f"rank 0 failed while evaluating '{split}': {value}")
        return value

    def evaluate_here(split: str) -> dict[str, float]:
        with timed(state.timings, "evaluation_s"):
            if task.generative:  # lm-evaluation-harness protocols (speft.evaluation)
                metrics, throughput[split] = task.evaluate(split, state.model, state.tokenizer, state.splits[split],
                                                           device=state.device, out_dir=state.run_dir)
            else:
                logits, labels = predict(state.model, loaders[split], state.device)
                metrics = task.compute_metrics(logits, labels)
            return {f"{split}/{k}": v for k, v in metrics.items()}

    return evaluate, throughput


def eval_names(state: RunState) -> list[str]:
    return [s for s in state.task.eval_splits if s in state.splits]


def train_and_validate(state: RunState, prepared: Prepared, mask, scorer: Scorer | None, k, logger, evaluate):
    """Train; validate every epoch or ``eval_every_steps`` on every evaluation split but ``test`` (evaluated
    once at the end); a dynamic mask is bound to the optimizer and called after every step."""
    spec, model = state.spec, state.model
    periodic = [s for s in eval_names(state) if s != "test"]
    validate_fn = (lambda step: {k: v for s in periodic for k, v in evaluate(s).items()}) if periodic else None
    dynamic = mask.dynamic

    def on_step(step: int) -> dict | None:
        record = mask.on_step_end(step)
        if record:
            check_same_mask(state, step)
        return record

    def bind_mask(optimizer, steps: int) -> None:
        mask.bind(MaskRuntime(model, sparse_layers(model), optimizer, steps, k, scorer,
                              batches_per_epoch=len(loader), grad_accum_steps=spec.trainer.grad_accum_steps))

    if state.dist.enabled:  # dropout: independent noise on each rank's slice (scoring streams keep their seeds)
        torch.manual_seed(spec.seed + 7919 * state.dist.rank)
    t0 = time.perf_counter()
    # Data-parallel: the single-process order of micro-batches; each rank collates its slice of each.
    collate = ShardCollate(state.collate, state.dist) if state.dist.enabled else state.collate
    loader = train_dataloader(state.encoded["train"], spec.trainer, collate, spec.seed)
    with state.stop or StopRequest():
        train_state = train(model, prepared.param_groups, loader, spec.trainer, state.device, on_log=logger.log,
                            validate=validate_fn, on_start=bind_mask if dynamic else None,
                            on_step=on_step if dynamic else None,
                            checkpointing=checkpointing(state, mask, scorer), dist=state.dist)
    state.timings["training_s"] = time.perf_counter() - t0 - state.timings.get("evaluation_s", 0.0)
    if dynamic:
        state.record.update(mask_final={n: {"selected": m.values.numel(), "total": weight_numel(m)}
                                        for n, m in sparse_layers(model).items()})
    state.record.update(history=train_state.history, mask_updates=train_state.mask_updates,
                        train_steps=train_state.step)
    if state.dist.enabled:  # how the examples were split
        state.record.data["processes"]["train_examples"] = state.dist.all_gather_object(train_state.examples)
    return train_state


def checkpointing(state: RunState, mask, scorer: Scorer | None) -> Checkpointing:
    """Checkpoints of this run: the loop's state plus the model's trainable state (sparse layers' entries,
    adapters, a head, or every weight for ``full``), the mask schedule's and the scorer's."""
    spec, model = state.spec, state.model
    resumed = state.record.data.get("resumed_from_steps", [])

    def save(loop_state: dict, optimizer) -> Path:
        step = loop_state["train_state"]["step"]
        if not state.dist.is_main:  # rank 0 writes (the ranks' own parts are gathered into its loop state)
            return checkpoint.path_of(state.run_dir, step)
        content = {"loop": loop_state, "model": checkpoint.trainable_state(model, optimizer),
                   "mask": mask.state_dict(), "scorer": scorer.state_dict() if scorer is not None else None}
        return checkpoint.save(state.run_dir, step, content, state.config, spec.trainer.keep_checkpoints,
                               meta={"logger_run_id": state.logger.run_id, "resumed_from_steps": resumed,
                                     "processes": state.dist.world})

    def restore(content: dict, optimizer) -> None:
        checkpoint.load_trainable_state(model, content["model"], optimizer)
        mask.load_state_dict(content["mask"])
        if scorer is not None and content["scorer"] is not None:
            scorer.load_state_dict(content["scorer"])

    return Checkpointing(save=save, every_steps=spec.trainer.checkpoint_every_steps,
                         every_minutes=spec.trainer.checkpoint_every_minutes,
                         resume=state.resume["state"] if state.resume else None, restore=restore, stop=state.stop)


def final_metrics(state: RunState, train_state, evaluate, logger) -> dict[str, float]:
    """The last validation, the test split, and the best periodic evaluation."""
    metrics = dict(train_state.history[-1]) if train_state.history else {}
    metrics.pop("step", None), metrics.pop("epoch", None)
    if "test" in eval_names(state):
        metrics.update(evaluate("test"))
    best = best_evaluation(train_state.history, state.task)
    logger.log({**metrics, **{f"best/{k}": v for k, v in best.items()}}, train_state.step)
    state.record.update(metrics=metrics, best_metrics=best)
    log.info("metrics: %s", metrics)
    return metrics
