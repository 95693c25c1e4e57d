"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import speft.components  # noqa: F401  registers every component and its config schema
import speft.config  # noqa: F401  stores the shared schemas
from speft.pipeline import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    sweep_dir = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
    result = run(cfg, run_dir=hc.runtime.output_dir, run_name=hc.job.override_dirname or hc.job.name,
                 sweep_dir=sweep_dir)
    return result.metrics.get("validation/accuracy")  # the objective for Hydra sweepers


if __name__ == "__main__":
    main()
