"""``wandb``: Weights & Biases. Mode ``auto`` is online with credentials and offline without."""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from speft.config import check_choice
from speft.loggers.base import LoggerConfig, RunLogger
from speft.registry import register

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "speft"  # W&B project
    entity: Optional[str] = None  # team or user; null = the account's default
    mode: str = "auto"  # auto: online when credentials exist, else offline (sync later with `wandb sync`)
    group: Optional[str] = None  # null: multirun jobs share a group named after the sweep directory
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, MODES)


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if has_credentials() and os.environ.get("WANDB_MODE") != "offline" else "offline"


@register("logger", "wandb", schema=WandbConfig)
class WandbLogger(RunLogger):
    run = None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def start(self, config: dict, run_dir: Path, run_name: str, sweep_dir: str | None,
              resume_id: str | None = None) -> None:
        import wandb

        mode = resolve_mode(self.cfg.mode)
        group = self.cfg.group or sweep_dir
        # A resumed run (speft.train.checkpoint) continues the W&B run of its checkpoint: same id.
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, mode=mode, group=group,
                              name=run_name, tags=list(self.cfg.tags), config=config, dir=str(run_dir),
                              reinit="finish_previous", id=resume_id, resume="allow" if resume_id else None)
        log.info("W&B run %s (mode %s, group %s%s)", self.run.id, mode, group, ", resumed" if resume_id else "")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, results: dict) -> None:
        if self.run is None:
            return
        summary = {k: v for k, v in results.get("metrics", {}).items()}
        summary.update({k: results.get(k) for k in ("status", "trainable_params", "density", "main_metric",
                                                      "num_score_examples")})
        summary.update({f"timings/{k}": v for k, v in results.get("timings", {}).items()})
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if results.get("status") == "completed" else 1)
        self.run = None
