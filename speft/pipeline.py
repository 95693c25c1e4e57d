"""One run: validate, plan the budget, load, score, select, train, evaluate, record.

Everything that can be checked without loading weights (the config, the target modules and the
budget, on a meta-device copy of the model) is checked before anything is loaded or written.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from speft import registry
from speft.config import Spec, min_set, validate
from speft.masks.base import MaskRuntime
from speft.methods.base import PrepareContext, count
from speft.models.loading import build_meta_model, find_targets, load_model, load_tokenizer, target_shapes
from speft.registry import ConfigError
from speft.results import RunRecord, completed_result, read_result, timed
from speft.salience.base import ScoreContext
from speft.sparse.layer import sparse_layers
from speft.train.loop import move, predict, train

log = logging.getLogger(__name__)


def build(spec: Spec):
    """Instantiate the registered components named by the config."""
    return {g: registry.get(g, getattr(spec, g).name).obj for g in ("task", "method", "metric", "mask", "logger")}


@dataclass
class Plan:
    """What pre-flight established without loading weights: the validated config, the task, the target
    shapes, the exact budget, and a completed result to return instead of running (``skip_completed``)."""

    spec: Spec
    task: Any
    shapes: dict[str, tuple[int, int]]
    budget: int | None  # trainable entries of the target modules; None for methods without salience
    config: dict  # the resolved config, as results.json records it
    previous: dict | None = None


def check_combination(spec: Spec, task) -> None:
    """Rules across config groups."""
    method_cls = registry.get("method", spec.method.name).obj
    mask_cls = registry.get("mask", spec.mask.name).obj
    if mask_cls.dynamic and not method_cls.uses_salience:
        raise ConfigError(f"mask={spec.mask.name} changes a sparse mask during training; method="
                          f"{spec.method.name} has none. Use mask=static or method=sparse")
    if not task.new_head and getattr(method_cls, "head_only", False):
        raise ConfigError(f"method={spec.method.name} trains only a new task head; task={spec.task.name} keeps "
                          f"its pretrained LM head, so nothing would train. Use another method")


def plan_budget(spec: Spec, task) -> tuple[dict[str, tuple[int, int]], int | None]:
    """Target shapes and, for salience methods, the exact number of trainable entries, from the
    model's structure alone (a meta-device copy)."""
    meta = build_meta_model(spec.model, task.head, task.num_labels, spec.paths.resolve("cache_dir"))
    shapes = target_shapes(find_targets(meta, spec.model.family, spec.method.targets, spec.method.target_regex))
    uses_salience = registry.get("method", spec.method.name).obj.uses_salience
    return shapes, spec.budget.resolve(shapes) if uses_salience else None


def preflight(cfg: DictConfig, run_dir: Path) -> Plan:
    """Everything checked before weights are loaded or anything is written: values, cross-group rules,
    targets and budget on the meta model, and the completed-result rule. Raises :class:`ConfigError`."""
    spec = validate(cfg)
    task = registry.get("task", spec.task.name).obj(spec.task, spec.paths.resolve("data_dir"))
    check_combination(spec, task)
    shapes, k = plan_budget(spec, task)
    config = spec.resolved()
    return Plan(spec, task, shapes, k, config, reusable_result(Path(run_dir), config, spec.skip_completed))


def example_stream(rows: list[dict], seed: int) -> Iterator[dict]:
    """Endless seeded reshuffles of ``rows``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(rows), generator=g).tolist():
            yield rows[i]


def train_dataloader(rows: list[dict], tcfg, collate, seed: int) -> DataLoader:
    """Shuffled batches; with ``group_by_length``, batches of similar lengths (less padding)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if tcfg.group_by_length:
        sampler = LengthGroupedSampler(tcfg.batch_size, lengths=[len(r["input_ids"]) for r in rows], generator=g)
        return DataLoader(rows, batch_size=tcfg.batch_size, sampler=sampler, collate_fn=collate)
    return DataLoader(rows, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate, generator=g)


def best_evaluation(history: list[dict], task) -> dict:
    """The periodic evaluation with the highest main validation metric (its step and epoch included)."""
    key = f"{getattr(task, 'validation_split', 'validation')}/{task.main_metric}"
    scored = [h for h in history if key in h and not math.isnan(h[key])]  # NaN: e.g. constant predictions
    return dict(max(scored, key=lambda h: h[key])) if scored else {}


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
        record_refusal(cfg, Path(run_dir), e)
        raise
    if plan.previous is not None:
        log.info("%s holds a completed result of this config; skipped (skip_completed=true)", run_dir)
        return RunResult(metrics=plan.previous["metrics"], results=plan.previous, model=None)

    spec, task = plan.spec, plan.task
    classes = build(spec)
    metric, mask, method = classes["metric"](spec.metric), classes["mask"](spec.mask), classes["method"](spec.method)
    logger = classes["logger"](spec.logger)
    record = RunRecord(run_dir, plan.config, spec.seed)
    record.update(main_metric=f"{task.validation_split}/{task.main_metric}")
    timings: dict[str, float] = {}
    try:
        logger.start(plan.config, run_dir, run_name, sweep_dir)
        metrics, model = _execute(spec, task, metric, mask, method, logger, record, timings, plan.budget, plan.shapes)
        timings["total_s"] = time.perf_counter() - t_start
        record.update(timings={k: round(v, 3) for k, v in timings.items()})
        data = record.finish("completed")
        logger.finish(data)
        return RunResult(metrics=metrics, results=data, model=model)
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
    RunRecord(run_dir, config, cfg.get("seed")).finish("failed", error)


def reusable_result(run_dir: Path, config: dict, skip_completed: bool) -> dict | None:
    """A completed result already in ``run_dir``: returned when ``skip_completed`` and its config is
    this one; otherwise an error, since running would overwrite it. None when there is none."""
    previous = read_result(run_dir)
    if previous is None or previous.get("status") != "completed":
        return None  # nothing there, or a failed or interrupted run: run (again)
    if not skip_completed:
        raise ConfigError(f"{run_dir} already holds a completed results.json; add skip_completed=true to "
                          f"keep it and skip this run, or choose another output folder")
    old = previous.get("config") or {}
    changed = sorted(k for k in old.keys() | config.keys() if k != "skip_completed" and old.get(k) != config.get(k))
    if changed:
        raise ConfigError(f"{run_dir} holds a completed result of a different config (differs in: "
                          f"{', '.join(changed)}); it is kept. Re-launch the sweep with the same overrides "
                          f"or choose another hydra.sweep.dir")
    return previous


@dataclass
class RunResult:
    metrics: dict[str, float]
    results: dict  # the content of results.json
    model: torch.nn.Module | None  # the fine-tuned model, sparse layers in place (None: a skipped run)


def _execute(spec: Spec, task, metric, mask, method, logger, record: RunRecord, timings, k, shapes):
    from transformers import set_seed

    tcfg, dbg = spec.trainer, spec.debug
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    set_seed(spec.seed)
    device = device_for(tcfg.device)

    with timed(timings, "data_s"):
        splits = task.splits(max_train=dbg.max_train_examples, max_eval=dbg.max_eval_examples,
                             max_generate=dbg.max_generate_examples)
    with timed(timings, "model_load_s"):
        tokenizer = load_tokenizer(spec.model, spec.paths.resolve("cache_dir"))
        model = load_model(spec.model, task.head, task.num_labels, spec.paths.resolve("cache_dir")).to(device)
    with timed(timings, "data_s"):
        # Generative tasks evaluate raw rows with their own evaluator; only training examples are encoded.
        encoded = {name: task.encode(tokenizer, rows, spec.model.max_length) for name, rows in splits.items()
                   if name == "train" or not task.generative}
    collate = task.collator(tokenizer)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = find_targets(model, spec.model.family, spec.method.targets, spec.method.target_regex)
    total_params = count(model.parameters())

    # Scoring examples: a seeded sample of the training split.
    # (GraSP draws two sets of that many: metric.sample_factor = 2.)
    n_score = min(metric.sample_factor * min_set(spec.metric.num_score_examples, dbg.max_score_examples),
                  len(encoded["train"]))
    g = torch.Generator().manual_seed(spec.seed)
    score_rows = [encoded["train"][i] for i in torch.randperm(len(encoded["train"]), generator=g)[:n_score].tolist()]
    score_bs = spec.metric.batch_size or tcfg.batch_size

    def score_batches():
        for i in range(0, len(score_rows), score_bs):
            yield move(collate(score_rows[i : i + score_bs]), device)

    head_lr = tcfg.head_lr or tcfg.lr
    ctx = PrepareContext(model=model, targets=targets, family=spec.model.family, budget=k, metric=metric, mask=mask,
                         score_batches=score_batches, num_score_examples=n_score, seed=spec.seed, timings=timings,
                         score_cache_dir=spec.paths.resolve("cache_dir"), new_head=task.new_head,
                         score_key={"model": asdict(spec.model), "task": asdict(spec.task), "split": "train",
                                    "train_examples": len(encoded["train"]), "batch_size": score_bs,
                                    "max_train_examples": dbg.max_train_examples})
    if tcfg.max_steps == 0 and method.uses_salience:
        log.info("trainer.max_steps=0: the sparse delta is selected but stays zero (the model as loaded)")
    prepared = method.prepare(ctx, tcfg.lr, head_lr)
    trainable = sum(prepared.trainable.values())
    target_total = sum(o * i for o, i in shapes.values())
    record.update(trainable_params=trainable, trainable=prepared.trainable, total_params=total_params,
                  density=prepared.target_trainable / target_total, mask=prepared.mask,
                  budget={"spec": str(spec.budget) if k is not None else None, "kind": spec.budget.kind,
                          "entries": k, "target_entries": target_total, "target_modules": len(shapes)},
                  num_score_examples=n_score if method.uses_salience else 0, scoring=ctx.scoring)
    if prepared.mask:
        logger.log_table("mask", ["module", "selected", "total", "density"],
                         [[n, m["selected"], m["total"], m["selected"] / m["total"]] for n, m in prepared.mask.items()])

    # Evaluation order does not change a metric: sorting by length keeps padding to a minimum.
    by_length = lambda rows: sorted(rows, key=lambda r: len(r["input_ids"]))  # noqa: E731
    loaders = {
        name: DataLoader(by_length(rows), batch_size=tcfg.eval_batch_size, shuffle=False, collate_fn=collate)
        for name, rows in encoded.items() if name in task.eval_splits
    }
    train_loader = train_dataloader(encoded["train"], tcfg, collate, spec.seed)
    eval_names = [s for s in task.eval_splits if s in splits]
    throughput: dict[str, dict] = {}

    def evaluate(split: str) -> dict[str, float]:
        with timed(timings, "evaluation_s"):
            if task.generative:  # lm-evaluation-harness protocols (speft.evaluation)
                metrics, throughput[split] = task.evaluate(split, model, tokenizer, splits[split], device=device,
                                                           out_dir=Path(record.path).parent,
                                                           max_new_tokens=dbg.max_new_tokens)
            else:
                logits, labels = predict(model, loaders[split], device)
                metrics = task.compute_metrics(logits, labels)
            return {f"{split}/{k}": v for k, v in metrics.items()}

    # Validation (every epoch or eval_every_steps) covers every evaluation split but the test split,
    # which is evaluated once at the end.
    periodic = [s for s in eval_names if s != "test"]
    validate_fn = (lambda step: {k: v for s in periodic for k, v in evaluate(s).items()}) if periodic else None

    # Dynamic masks re-score on fresh training examples: a seeded stream apart from the first sample.
    stream = example_stream(encoded["train"], spec.seed + 1)

    def rescore(n: int | None) -> dict[str, torch.Tensor]:
        n = min(min_set(n or n_score, dbg.max_score_examples), len(encoded["train"]))
        rows = [next(stream) for _ in range(n)]
        batches = lambda: (move(collate(rows[i : i + score_bs]), device) for i in range(0, n, score_bs))  # noqa: E731
        return metric.score(ScoreContext(model, sparse_layers(model), batches, n, spec.seed))

    def bind_mask(optimizer, steps: int) -> None:
        mask.bind(MaskRuntime(model, sparse_layers(model), optimizer, steps, k, rescore))

    dynamic = getattr(mask, "dynamic", False)
    t0 = time.perf_counter()
    state = train(model, prepared.param_groups, train_loader, tcfg, device, dbg.max_train_steps,
                  on_log=logger.log, validate=validate_fn, on_start=bind_mask if dynamic else None,
                  on_step=mask.on_step_end if dynamic else None)
    timings["training_s"] = time.perf_counter() - t0 - timings.get("evaluation_s", 0.0)
    if dynamic:
        record.update(mask_final={n: {"selected": m.values.numel(), "total": m.weight.numel()}
                                  for n, m in sparse_layers(model).items()})
    if spec.method.save_adapter:
        method.save(model, Path(record.path).parent / "adapter", base_model=spec.model.name_or_path,
                    base_package=spec.model.package, targets=sorted(targets), metric=spec.metric.name,
                    mask=spec.mask.name, density=str(spec.budget))

    metrics = dict(state.history[-1]) if state.history else {}
    metrics.pop("step", None), metrics.pop("epoch", None)
    if "test" in eval_names:
        metrics.update(evaluate("test"))
    best = best_evaluation(state.history, task)
    logger.log({**metrics, **{f"best/{k}": v for k, v in best.items()}}, state.step)
    record.update(metrics=metrics, best_metrics=best, history=state.history, mask_updates=state.mask_updates,
                  train_steps=state.step,
                  **({"evaluation": throughput} if throughput else {}))
    log.info("metrics: %s", metrics)
    return metrics, model
