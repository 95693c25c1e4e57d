"""``hydra/sweeper=speft``: Hydra's basic sweeper for sweep folders that grow.

A launch into a folder that already holds earlier launches' jobs gives each job the folder of the
earlier job with exactly the same overrides (``.hydra/overrides.yaml``), so re-launching a sweep
resumes, skips or completes its own jobs, and every other job a fresh folder numbered after the
highest one there (``0/ 1/`` then ``2/ 3/``): no job ever lands in another job's folder. The earlier
launch's record is kept: the folder's ``multirun.yaml`` is renamed ``multirun.<k>.yaml`` (k = 1, 2, ...)
before this launch writes its own. With ``skip_completed=true`` a job whose config already completed in
another folder of the sweep returns that result (:func:`speft.pipeline.completed_twin`).
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses would look its string annotations up.
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore

RECORD = "multirun.yaml"


def next_job_number(sweep_dir: Path) -> int:
    """One past the highest numbered job folder of ``sweep_dir`` (0 when there is none)."""
    if not sweep_dir.is_dir():
        return 0
    return max((int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), default=-1) + 1


def keep_earlier_record(sweep_dir: Path) -> Optional[Path]:
    """Rename an earlier launch's ``multirun.yaml`` to the first free ``multirun.<k>.yaml``; returns its new path."""
    record = sweep_dir / RECORD
    if not record.is_file():
        return None
    k = 1
    while (sweep_dir / f"multirun.{k}.yaml").exists():
        k += 1
    return record.rename(sweep_dir / f"multirun.{k}.yaml")


def earlier_jobs(sweep_dir: Path) -> dict[tuple, int]:
    """Overrides -> job number of the job folders already in ``sweep_dir`` (the first, for duplicates)."""
    import yaml

    out: dict[tuple, int] = {}
    numbered = sorted(int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if sweep_dir.is_dir() else []
    for n in numbered:
        try:
            overrides = yaml.safe_load((sweep_dir / str(n) / ".hydra" / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(overrides, list):
            out.setdefault(tuple(overrides), n)
    return out


def job_numbers(batch: list[list[str]], earlier: dict[tuple, int], fresh: Iterator[int]) -> list[int]:
    """Each job's number: its earlier job's, else the next fresh one."""
    return [earlier[tuple(job)] if tuple(job) in earlier else next(fresh) for job in batch]


class GrowingSweeper(BasicSweeper):
    def sweep(self, arguments: list) -> Any:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        earlier, fresh = earlier_jobs(sweep_dir), itertools.count(next_job_number(sweep_dir))
        keep_earlier_record(sweep_dir)
        launch = self.launcher.launch

        def launch_in_own_folders(job_overrides, initial_job_idx: int):
            numbers = job_numbers([list(j) for j in job_overrides], earlier, fresh)
            results, start = [], 0
            for end in range(1, len(numbers) + 1):  # runs of consecutive numbers go to the launcher together
                if end == len(numbers) or numbers[end] != numbers[end - 1] + 1:
                    results += launch(job_overrides[start:end], initial_job_idx=numbers[start])
                    start = end
            return results

        self.launcher.launch = launch_in_own_folders
        return super().sweep(arguments)


@dataclass
class GrowingSweeperConf:  # BasicSweeperConf's keys
    _target_: str = "hydra_plugins.speft_sweeper.speft_sweeper.GrowingSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="speft", node=GrowingSweeperConf, provider="speft")
