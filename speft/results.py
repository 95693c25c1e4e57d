"""``results.json``: one file per run, written atomically, holding everything needed to trust it.

Keys: ``status`` ("completed" | "failed" | "interrupted": a stop signal, checkpoint written), ``error``,
``config`` (resolved), ``metrics``,
``history`` (validation and training curves), ``trainable_params``, ``trainable`` (by part),
``total_params``, ``density``, ``budget``, ``mask`` (per module: selected and total entries),
``timings`` (seconds), ``peak_memory_mb``, ``versions``, ``git_sha``, ``git_dirty``, ``seed``,
``started_at``, ``finished_at``, ``processes`` (data-parallel world size and backend); ``main_metric``
(the task's main validation key) and ``salience`` (whether the method uses a salience mask) from the
start of the run, so a failed run has them too; ``resumed`` and ``resumed_from_steps`` (checkpoint
resumes), ``interrupted`` (signal, step, checkpoint).
"""

from __future__ import annotations

import json
import platform
import subprocess
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from speft.config import PROJECT_ROOT
from speft.utils import atomic_write, process_peak_mb

RESULTS_FILE = "results.json"
LOWER_IS_BETTER = frozenset({"nll"})  # metric names (the part after the split) where smaller is better


def higher_is_better(key: str) -> bool:
    """Whether a larger value of metric ``key`` (``test/nll`` or ``nll``) is better."""
    return key.split("/")[-1] not in LOWER_IS_BETTER


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=_jsonable) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _jsonable(obj):
    if isinstance(obj, (Path,)):
        return str(obj)
    if type(obj).__name__ == "Tensor":  # torch is not imported here: the report reads results without it
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_result(run_dir: Path) -> dict | None:
    """The ``results.json`` in ``run_dir``, or None when there is none or it cannot be read."""
    try:
        data = json.loads((Path(run_dir) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def completed_result(run_dir: Path) -> bool:
    return (read_result(run_dir) or {}).get("status") == "completed"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("speft", "torch", "transformers", "hydra-core", "omegaconf", "wandb", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


def git_state() -> tuple[str | None, bool | None]:
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory allocated when on a GPU."""
    import torch

    return process_peak_mb(cuda=torch.cuda.is_available() and torch.cuda.is_initialized())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """Collects a run's results; writes ``results.json`` once, completed, failed or interrupted."""

    def __init__(self, run_dir: Path, config: dict, seed: int, write: bool = True) -> None:
        self.path = Path(run_dir) / RESULTS_FILE
        self.write = write  # False: a data-parallel run's rank > 0 (rank 0 writes the file)
        sha, dirty = git_state()
        self.data: dict = {
            "status": "running",
            "error": None,
            "config": config,
            "metrics": {},
            "history": [],
            "trainable_params": None,
            "trainable": {},
            "total_params": None,
            "density": None,
            "budget": None,
            "mask": {},
            "timings": {},
            "peak_memory_mb": None,
            "versions": versions(),
            "git_sha": sha,
            "git_dirty": dirty,
            "seed": seed,
            "started_at": now(),
            "finished_at": None,
        }

    def update(self, **values) -> None:
        self.data.update(values)

    def finish(self, status: str, error: BaseException | None = None) -> dict:
        self.data["status"] = status
        if error is not None:
            self.data["error"] = {"type": type(error).__name__, "message": str(error),
                                  "traceback": traceback.format_exception(error)}
        self.data["peak_memory_mb"] = peak_memory_mb()
        self.data["finished_at"] = now()
        if self.write:
            write_json_atomic(self.path, self.data)
        return self.data
