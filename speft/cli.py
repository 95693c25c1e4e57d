"""The command line: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps).

The Hydra callback runs :func:`speft.pipeline.preflight` before Hydra creates an output folder, so a
bad single run leaves nothing behind; the run then reuses that pre-flight (once per job). A sweep's
config is validated before any job starts; each job runs its own pre-flight, and a job refused there
records a failed results.json (see :func:`speft.pipeline.run`). Hydra turns exceptions raised by
callbacks into warnings, so a refused config ends the process with ``SystemExit`` (exit status 1, the
message on stderr, no traceback). A run stopped by SIGTERM/SIGUSR1/SIGUSR2 writes a checkpoint and
exits with status 128 + the signal's number; the same command resumes it (speft.train.checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import speft.components  # noqa: F401  registers every component and its config schema
from speft.config import validate
from speft.pipeline import Plan, RunResult, preflight, run
from speft.registry import ConfigError
from speft.train.checkpoint import Interrupted

_checked: list[Plan] = []  # the callback's pre-flight of a single run, taken by main()
CONF = Path(__file__).resolve().parent.parent / "conf"
INTERNAL_GROUPS = ("schema", "debug_task", "hydra")  # composed by the configs themselves, not chosen by users


def option_groups() -> dict[str, list[str]]:
    """The config groups a user picks an option of (``conf/<group>/``; nested files are options such as
    ``task=glue/sst2``) and their options, with the registry's aliases (options without a file)."""
    from speft import registry

    return {d.name: sorted([*(p.relative_to(d).with_suffix("").as_posix() for p in d.rglob("*.yaml")),
                            *registry.aliases(d.name)])
            for d in sorted(CONF.iterdir()) if d.is_dir() and d.name not in INTERNAL_GROUPS}


def help_groups() -> str:
    """``--help``'s list of groups and options (Hydra's own lists the internal schema groups too)."""
    return "\n".join(f"{group}: {', '.join(options)}" for group, options in option_groups().items())


OmegaConf.register_new_resolver("speft_groups", help_groups, replace=True)


def check_options(args: list[str]) -> None:
    """Before Hydra: an unknown ``group=option`` stops with the valid options and the closest ones (Hydra's
    own message offers no suggestion). Sweep functions (``choice(...)``) and interpolations are left to Hydra."""
    import difflib

    groups = option_groups()
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if arg.startswith("-") or not sep or key not in groups or any(c in value for c in "()[]{}$"):
            continue
        for option in value.split(","):
            if option in groups[key] or option in ("", "null"):
                continue
            close = difflib.get_close_matches(option, groups[key], n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(f'{key}={c}' for c in close)}?" if close else ""
            raise SystemExit(f"Invalid configuration: unknown option {key}={option}.{hint} "
                             f"Valid choices for {key}: {', '.join(groups[key])}")


def entry() -> None:
    """``python run.py``: check the chosen options, then Hydra's main."""
    import sys

    check_options(sys.argv[1:])
    main()


class PreflightCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _checked.clear()
        plan = _exit_on_error(lambda: preflight(config, Path(config.hydra.run.dir)))
        if plan.spec.dry_run:  # the estimate, then stop: no run folder, no weights loaded
            print(dry_run_report(plan))
            raise SystemExit(0)
        _checked.append(plan)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(lambda: validate(config))  # the values every job shares; each job checks the rest


def dry_run_report(plan: Plan) -> str:
    spec = plan.spec
    budget = "all weights" if plan.entries is None else f"{plan.entries:,} trainable entries"
    lines = [f"dry run: model={spec.model.name} task={spec.task.name} method={spec.method.name}: {budget} in "
             f"{len(plan.shapes)} target modules"]
    return "\n".join(lines + (plan.memory.lines() if plan.memory is not None else []))


def _exit_on_error(fn):
    try:
        return fn()
    except ConfigError as e:
        raise SystemExit(f"Invalid configuration: {e}") from None


def checked_plan(cfg: DictConfig) -> Plan | None:
    """The callback's pre-flight when it was of this very config, else None."""
    plan = _checked.pop() if _checked else None
    if plan is None or plan.spec.resolved() != OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False):
        return None
    return plan


@hydra.main(config_path=str(Path(__file__).resolve().parent.parent / "conf"), config_name="config",
            version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the task's main metric (the objective for Hydra sweepers)."""
    hc = HydraConfig.get()
    sweep_dir = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
    try:
        result = run(cfg, run_dir=Path(hc.runtime.output_dir), run_name=hc.job.override_dirname or hc.job.name,
                     sweep_dir=sweep_dir, plan=checked_plan(cfg))
    except Interrupted as e:  # checkpoint written, results.json says "interrupted": the usual 128 + signal
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # the second Ctrl-C: results.json says "interrupted"; no traceback
        raise SystemExit(130) from None
    return objective(result)


def objective(result: RunResult) -> float | None:
    """The task's main validation metric (``combined_score`` for MRPC, ``matthews_correlation`` for CoLA...)."""
    return result.metrics.get(result.results.get("main_metric"))
