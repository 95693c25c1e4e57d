"""Experiment loggers. Local result files are written by speft.results whatever the logger."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING


@dataclass
class LoggerConfig:
    name: str = MISSING  # the option's name, the same as its YAML file


class RunLogger:
    def __init__(self, cfg: LoggerConfig) -> None:
        self.cfg = cfg

    run_id: str | None = None  # the backend's run id: a checkpoint keeps it, so a resumed run logs into the same run

    def start(self, config: dict, run_dir: Path, run_name: str, sweep_dir: str | None,
              resume_id: str | None = None) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self, results: dict) -> None:
        pass
