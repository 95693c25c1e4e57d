"""One run from the outside: pre-flight, then the recipe (:class:`speft.recipe.Recipe`: load, score, select,
train, evaluate), its outcome recorded (completed, interrupted, failed; a refusal too).

Everything that can be checked without loading weights (the config, the target modules and the
budget, on a meta-device copy of the model) is checked before anything is loaded or written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from speft import distributed, registry
from speft.config import Spec, validate
from speft.distributed import Dist
from speft.loggers.base import RunLogger
from speft.memory import MemoryEstimate
from speft.memory import estimate as estimate_memory
from speft.models.loading import (
    build_meta_model,
    find_targets,
    head_parameters,
    target_shapes,
)
from speft.recipe import Recipe, device_for
from speft.registry import ConfigError
from speft.results import RunRecord, completed_result, read_result, write_json_atomic
from speft.train import checkpoint
from speft.train.checkpoint import Interrupted, StopRequest

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
    """The run after pre-flight (:class:`~speft.recipe.Recipe`), its outcome recorded whatever it is; with several
    processes every rank runs it, rank 0 alone writes."""
    spec = plan.spec
    run_dir, previous = dist.broadcast_object((run_dir, plan.previous))  # Hydra's ${now} may differ per rank
    if previous is not None:
        source = previous.get("reused_from", run_dir)
        log.info("%s holds a completed result of this config; skipped (skip_completed=true)", source)
        if "reused_from" in previous and dist.is_main:  # this job's own folder says where its result is
            write_json_atomic(Path(run_dir) / "reused.json", {"results": str(Path(source) / "results.json")})
        return RunResult(metrics=previous["metrics"], results=previous, model=None)
    # Only rank 0 writes results.json and logs to W&B; the other ranks keep a record in memory.
    logger = registry.get("logger", spec.logger.name).obj(spec.logger) if dist.is_main else RunLogger(spec.logger)
    record = start_record(plan, dist, Path(run_dir))
    timings: dict[str, float] = {}
    stop = StopRequest()
    ended = Ending(record, logger, timings, t_start)
    try:
        distributed.check_same_config(dist, plan.config)  # a mismatch: a failed result, never a result
        dist.check_same("the checkpoint to resume from", str(plan.resume["path"] if plan.resume else None),
                        "give every process the same hydra.run.dir")
        logger.start(plan.config, run_dir, run_name, sweep_dir,
                     resume_id=plan.resume.get("logger_run_id") if plan.resume else None)
        metrics, model = Recipe(plan, dist, Path(run_dir), logger, record, timings, stop).run()
        data = ended("completed")
        if dist.is_main:
            checkpoint.remove_all(Path(run_dir))  # the result is final: checkpoints are no longer needed
        return RunResult(metrics=metrics, results=data, model=model)
    except Interrupted as e:  # a checkpoint is written: rerunning the same command resumes
        ended("interrupted", interrupted=e.record())
        log.warning("%s; run the same command into %s to resume", e, run_dir)
        stop.chain()  # under submitit: its handler requeues the job (and exits)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): stopped at once, no new checkpoint
        latest = checkpoint.checkpoints(run_dir)
        ended("interrupted", interrupted={"signal": "SIGINT", "step": None,
                                          "checkpoint": str(latest[-1][1].with_suffix(".pt")) if latest else None})
        log.warning("stopped by Ctrl-C; rerun the same command into %s to %s", run_dir,
                    "resume from its latest checkpoint" if latest else "start again")
        raise
    except BaseException as e:  # record the failure, then let it propagate
        ended("failed", error=e)
        raise


def start_record(plan: Plan, dist: Dist, run_dir: Path) -> RunRecord:
    """The run's record before it starts: what it reports, how many processes, what it resumes from."""
    spec, task = plan.spec, plan.task
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
    return record


@dataclass
class Ending:
    """Finishes a run's record with its status (completed, interrupted, failed) and its timings, and the logger."""

    record: RunRecord
    logger: Any
    timings: dict[str, float]
    t_start: float

    def __call__(self, status: str, error: BaseException | None = None, **extra) -> dict:
        self.timings["total_s"] = time.perf_counter() - self.t_start
        self.record.update(timings={k: round(v, 3) for k, v in self.timings.items()}, **extra)
        data = self.record.finish(status, error)
        try:
            self.logger.finish(data)
        except Exception:  # noqa: BLE001 - a failure's own error matters more
            if status != "failed":
                raise
            log.exception("logger failed while finishing")
        return data


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
