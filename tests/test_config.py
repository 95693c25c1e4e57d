"""Every option composes and validates; bad values fail at start-up naming the value and choices."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speft import registry
from speft.config import Budget, validate
from speft.registry import ConfigError

from .conftest import CONF, ROOT, compose_cfg

GROUPS = ["model", "task", "method", "metric", "mask", "trainer", "logger", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_cfg(f"{group}={option}")
    spec = validate(cfg)
    node = getattr(spec, group)
    # one string everywhere: CLI option = YAML file = registry name; an alias file selects its canonical option
    assert node.name == registry.aliases(group).get(option, option)


@pytest.mark.parametrize("group", ["task", "method", "metric", "mask", "logger"])
def test_registry_and_config_files_match(group):
    files = {p.stem for p in (CONF / group).glob("*.yaml")}
    assert files == set(registry.names(group)) | set(registry.aliases(group))


def _error(*overrides):
    from hydra.errors import HydraException

    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as info:
        validate(compose_cfg(*overrides))
    return str(info.value)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("metric=nope", ["nope", "grad"]),
        ("mask=nope", ["nope", "static"]),
        ("task=nope", ["nope", "rotten_tomatoes"]),
        ("metric.nope=1", ["nope"]),
        ("trainer.lr=fast", ["fast", "lr"]),
        ("trainer.batch_size=0", ["batch_size=0"]),
        ("mask.selection=everywhere", ["everywhere", "global", "local"]),
        ("logger.mode=loud", ["loud", "offline", "disabled"]),
        ("method.name=lora", ["lora", "sparse"]),
        ("model.family=t5", ["t5", "bert", "llama"]),
        ("density=0", ["density=0", "fraction"]),
        ("density=2.0", ["density=2.0", "(0, 1]"]),
        ("density=-0.5", ["density=-0.5"]),
        ("density=lora:0", ["lora:0", "lora:<r>"]),
        ("density=half", ["half", "lora:<r>"]),
        ("trainer.warmup_ratio=1.5", ["warmup_ratio=1.5"]),
    ],
)
def test_bad_values_fail_with_a_clear_message(override, expected):
    message = _error(override)
    for part in expected:
        assert part in message, message


SHAPES = {f"l{i}.{p}": (384, 384) for i in range(6) for p in "qkvo"}


@pytest.mark.parametrize(
    "raw,entries",
    [("lora:8", 8 * 768 * 24), (0.5, 384 * 384 * 12), (1, 384 * 384 * 24), (1.0, 384 * 384 * 24), (1000, 1000)],
)
def test_budget_resolves(raw, entries):
    assert Budget.parse(raw).resolve(SHAPES) == entries


@pytest.mark.parametrize("raw", [2, 23, 384 * 384 * 24 + 1, "lora:193"])
def test_budget_out_of_range_for_targets(raw):
    with pytest.raises(ConfigError, match="density"):
        Budget.parse(raw).resolve(SHAPES)


def test_defaults_are_the_documented_default_run():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.task.name, cfg.method.name, cfg.metric.name, cfg.mask.name) == (
        "minilm", "rotten_tomatoes", "sparse", "grad", "static")
    assert cfg.density == "lora:8" and cfg.mask.selection == "global" and cfg.logger.name == "wandb"
    assert OmegaConf.select(cfg, "method.train_head") is True


def _run_cli(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}/run", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("args,expected", [
    (["density=2"], "density=2"),
    (["metric=snipp"], "Available options in 'metric'"),
    (["trainer.lr=abc"], "trainer.lr"),
])
def test_cli_rejects_bad_config_quickly_and_writes_nothing(tmp_path, args, expected):
    proc, _ = _run_cli(tmp_path, *args)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # rejected before Hydra creates the run folder
