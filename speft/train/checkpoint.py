"""Checkpoints of a training run, for an exact resume after a kill, a time limit or a preemption.

A checkpoint is two files in ``<run dir>/checkpoints/``: ``step-<8 digits>.pt`` (``torch.save`` of
everything the run needs to continue: trainable state, optimizer and scheduler, RNG states, the
position in the seeded data order, the training state) and ``step-<8 digits>.json`` (the step, the
run's config, the ``.pt`` file's size), each written to a temporary file and renamed, the JSON last.
A checkpoint exists only once its JSON does, so an interrupted write never leaves one that looks
valid; a ``.pt`` whose size or content does not match gives :class:`CheckpointError` naming the file,
and the older checkpoints stay. :func:`save` is the only writer (one place for "rank 0 only").

Resume rule (``resume=auto``, the default): the same command into the same run folder continues from
its latest checkpoint; a different config refuses and names the keys that differ. ``resume=never``
refuses a folder that holds checkpoints (nothing is mixed or deleted). A completed run removes its
checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speft.config import ADDED_KEYS, NON_COMPUTING_KEYS
from speft.registry import ConfigError
from speft.utils import atomic_write

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.json$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (truncated, corrupted, of another config): nothing was loaded."""


class Interrupted(Exception):
    """Training stopped at a step boundary after SIGTERM/SIGUSR1/SIGUSR2, with a checkpoint written."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path

    def record(self) -> dict:
        """results.json's ``interrupted``: the signal's name, the step and the checkpoint written."""
        return {"signal": signal.Signals(self.signum).name, "step": self.step, "checkpoint": str(self.path)}


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, JSON path) of every checkpoint of ``run_dir``, oldest first."""
    d = folder(run_dir)
    found = [(int(m.group(1)), p) for p in d.glob("step-*.json") if (m := _NAME.match(p.name))] if d.is_dir() else []
    return sorted(found)


def save(run_dir: Path, step: int, state: dict, config: dict, keep: int, meta: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` (``state``: any picklable tree of tensors and plain values;
    ``meta``: small facts read before loading, e.g. the logger's run id), then remove all but the latest
    ``keep``. Returns the ``.pt`` path."""
    pt = path_of(run_dir, step)
    atomic_write(pt, lambda tmp: torch.save(state, tmp))
    record = {"step": step, "file": pt.name, "bytes": pt.stat().st_size, **(meta or {}), "config": config}
    atomic_write(pt.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)))
    for _, old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)  # the JSON first: a half-removed checkpoint never looks valid
        old.with_suffix(".pt").unlink(missing_ok=True)
    return pt


def path_of(run_dir: Path, step: int) -> Path:
    return folder(run_dir) / f"step-{step:08d}.pt"


def remove_all(run_dir: Path) -> None:
    for _, meta in checkpoints(run_dir):
        meta.unlink(missing_ok=True)
        meta.with_suffix(".pt").unlink(missing_ok=True)


def read_meta(meta: Path) -> dict:
    try:
        data = json.loads(meta.read_text())
        data["step"], data["bytes"]  # noqa: B018 - the keys every checkpoint has
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {meta} cannot be read ({e}); delete it to resume from the previous "
                              f"checkpoint, or choose another output folder") from None
    pt = meta.with_suffix(".pt")
    size = pt.stat().st_size if pt.is_file() else None
    if size != data["bytes"]:
        raise CheckpointError(f"checkpoint {pt} is {'missing' if size is None else f'{size} bytes'}, its record "
                              f"{meta.name} says {data['bytes']}: truncated or damaged. Delete both files to resume "
                              f"from the previous checkpoint{previous_hint(meta)}")
    return data


def previous_hint(meta: Path) -> str:
    run_dir = meta.parent.parent
    older = [p for s, p in checkpoints(run_dir) if p != meta and p.name < meta.name]
    return f" ({older[-1].with_suffix('.pt').name})" if older else " (there is none: the run would start over)"


def differing_keys(old: dict, new: dict, ignore: tuple[str, ...] = NON_COMPUTING_KEYS) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (``ignore``d keys left out; a key of
    :data:`~speft.config.ADDED_KEYS` missing on one side reads as its value there)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys()
                  if k not in ignore and a.get(k, ADDED_KEYS.get(k)) != b.get(k, ADDED_KEYS.get(k)))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dotted.key": value}`` (an empty dict stays a value)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def resumable(run_dir: Path, config: dict, mode: str, processes: int = 1) -> dict | None:
    """The latest checkpoint's record to resume from (None: start fresh). Raises :class:`CheckpointError`
    when ``mode`` is ``never`` and there are checkpoints, when they are of another config or of another
    number of data-parallel ``processes``, or when the latest is damaged (the older ones are kept)."""
    found = checkpoints(run_dir)
    if not found:
        return None
    latest = found[-1][1]
    if mode == "never":
        raise CheckpointError(f"{folder(run_dir)} holds checkpoints of a run (latest: step {found[-1][0]}) and "
                              f"resume=never: use resume=auto to continue it, delete the folder to start over, "
                              f"or choose another output folder")
    meta = read_meta(latest)
    changed = differing_keys(meta.get("config") or {}, config)
    if changed:
        raise CheckpointError(f"{latest} is a checkpoint of a different config (differs in: {', '.join(changed)}); "
                              f"it is kept. Run the same command to resume, or choose another output folder")
    if meta.get("processes", 1) != processes:
        raise CheckpointError(f"{latest} was written by a run of {meta.get('processes', 1)} process(es); this "
                              f"one has {processes}. Resume with the same number of processes (each rank's "
                              f"random streams are in the checkpoint), or choose another output folder")
    meta["path"] = latest.with_suffix(".pt")
    return meta


def load(path: Path) -> dict:
    """The checkpoint at ``path``; :class:`CheckpointError` naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it and its "
                              f".json to resume from the previous checkpoint{previous_hint(path.with_suffix('.json'))}"
                              ) from None


# ----------------------------------------------------------------------------------------------
# The model's trainable state

def trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    skip: frozenset[int] = frozenset()) -> dict:
    """What training changed in ``model``: every trainable parameter by name (a head, LoRA/PiSSA/DoRA adapters, all
    weights for ``full``) but those whose ``id`` is in ``skip`` (a method stores them its own way, e.g. the sparse
    layers' entries: ``Method.trainable_state``), and the names of the optimizer's parameters in its groups' order
    (its state is stored by position). The frozen base weights are rebuilt by loading the model again."""
    names = {id(p): n for n, p in model.named_parameters()}
    # host copies: a clone on the accelerator would double a `full` run's weights there while saving
    return {"params": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                       if p.requires_grad and id(p) not in skip},
            "optimizer_order": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
            if optimizer is not None else None}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Put :func:`trainable_state` back: the optimizer's groups in the saved order, the parameters' values."""
    params = dict(model.named_parameters())
    order = state.get("optimizer_order")
    if optimizer is not None and order is not None:  # the saved order (a cached score file lists modules sorted)
        for group, names in zip(optimizer.param_groups, order):
            ids = {id(q) for q in group["params"]}
            if sorted(names) != sorted(n for n, p in params.items() if id(p) in ids):
                raise CheckpointError(f"the checkpoint's optimizer group '{group.get('name')}' holds other "
                                      f"parameters than this run's")
            group["params"] = [params[n] for n in names]
    missing = sorted(set(state["params"]) - set(params))
    if missing:
        raise CheckpointError(f"the checkpoint has parameters the model lacks: {', '.join(missing[:5])}")
    for name, value in state["params"].items():
        params[name].copy_(value)


# ----------------------------------------------------------------------------------------------
# RNG states

def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Signals

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2")) if s)


class StopRequest:
    """While active, SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's and submitit's warnings before a
    time limit or a preemption) only set :attr:`signum`; the training loop checkpoints at the next
    optimizer-step boundary and stops. A second SIGINT stops at once (``KeyboardInterrupt``). :meth:`chain`
    then calls the handlers that were there before (submitit's requeue) for the other signals, so a cluster
    job is requeued after its checkpoint is written."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if _main_thread():
            for s in (signal.SIGINT, *STOP_SIGNALS):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous_restored = dict(self._previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint at the next optimizer step, then stopping (Ctrl-C again: stop at "
                  "once). Rerun the same command to resume.", file=sys.stderr, flush=True)
        elif self.signum is None:
            log.warning("caught %s: a checkpoint is written at the next optimizer step, then the run stops",
                        signal.Signals(signum).name)
        self.signum = self.signum or signum

    def chain(self) -> None:
        """Call the handler that was installed before for the caught signal (when it was a function); not for
        SIGINT, whose default handler would turn the clean stop into a ``KeyboardInterrupt``."""
        previous = getattr(self, "_previous_restored", self._previous).get(self.signum)
        if callable(previous) and self.signum != signal.SIGINT:
            previous(self.signum, None)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
