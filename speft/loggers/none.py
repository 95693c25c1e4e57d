"""``none``: log nothing beyond the local result files."""

from __future__ import annotations

from dataclasses import dataclass

from speft.loggers.base import LoggerConfig, RunLogger
from speft.registry import register


@dataclass
class NoneLoggerConfig(LoggerConfig):
    name: str = "none"


@register("logger", "none", schema=NoneLoggerConfig)
class NoneLogger(RunLogger):
    pass
