"""Data-parallel runs on torch.distributed: the process group and the few collectives a run needs.

A run uses N processes when it is launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` in the environment) or as a submitit job with several SLURM tasks
(``hydra/launcher=slurm`` with ``tasks_per_node``/``nodes``: submitit's
``TorchDistributedEnvironment`` exports the same variables from ``SLURM_*``). Without those variables
:func:`init` returns :data:`SINGLE`, whose collectives do nothing: a single process runs exactly as
before, with no process group.

Backend: NCCL when the run's device is CUDA (each process uses ``cuda:<LOCAL_RANK>``), gloo on CPU.
A collective that waits longer than ``timeout_min`` (a rank that died or hangs) raises on the others,
and so does gloo as soon as a peer's connection closes: the run then records ``failed``, never a result.
With NCCL, what lives on the host goes through a second, gloo group (:attr:`Dist.host_group`): the per-step
checkpoint/stop flags, pickled objects (configs, digests, the loop state of checkpoints) and the other ranks'
wait while rank 0 evaluates. Nothing is copied to the GPU and back for them, no CUDA tensor is pickled, a dead
rank is noticed at the next step's flags (its connection closes) with a ``failed`` result rather than by
NCCL's watchdog killing the process, and a long evaluation does not sit in an NCCL collective.

Batch semantics (see README "Multi-process runs"): every optimizer step sees the same examples as a
single process, ``trainer.batch_size × trainer.grad_accum_steps`` of the same seeded order, and each
rank takes every N-th example of every micro-batch (:class:`ShardCollate`); each rank's loss is weighted
by its slice's share of the loss items and the gradients are averaged over the ranks
(:meth:`Dist.average_gradients`), so the step equals the single-process one up to float summation
order (and dropout, which draws its noise per rank).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

SHARE = "_loss_share"  # key a sharded micro-batch carries: its share of the whole micro-batch's loss items
BUCKET_ENTRIES = 2**25  # entries per all-reduce buffer (128 MiB fp32): full fine-tuning never copies all gradients
IGNORE_INDEX = -100  # label of a token that no loss counts (prompts, padding), as transformers' losses


class DistributedError(RuntimeError):
    """Ranks disagree (config, mask) or cannot run together; the run stops with this error."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, local rank and whether a group exists."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, every collective is a no-op
    host_group: Any = None  # gloo group for host data when the backend is NCCL; None: the default group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:<local rank>`` for a CUDA run, else unchanged."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    # -- collectives (no-ops for a single process) --------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.host_group)

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.host_group)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=self.host_group)
        return box[0]

    def all_reduce_(self, tensors: Iterable[torch.Tensor], op: str = "sum", host: bool = False) -> None:
        """Reduce ``tensors`` in place over the ranks (``sum``, ``min`` or ``max``), flattened into
        buffers of one dtype and device of at most :data:`BUCKET_ENTRIES` entries (one collective each;
        a larger tensor goes alone). ``host``: small host data (flags) through :attr:`host_group`, never via the
        GPU; other host tensors (offloaded score buffers) are reduced on the GPU bucket by bucket under NCCL, far
        faster than gloo for gigabytes."""
        if not self.enabled:
            return
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
                     "max": torch.distributed.ReduceOp.MAX}[op]
        groups: dict[tuple, list[list[torch.Tensor]]] = {}
        sizes: dict[tuple, int] = {}
        for t in tensors:
            key = (t.dtype, t.device)
            buckets = groups.setdefault(key, [[]])
            if buckets[-1] and sizes[key] + t.numel() > BUCKET_ENTRIES:
                buckets.append([])
                sizes[key] = 0
            buckets[-1].append(t)
            sizes[key] = sizes.get(key, 0) + t.numel()
        for ts in (bucket for buckets in groups.values() for bucket in buckets):
            flat = torch.cat([t.reshape(-1) for t in ts])
            if not host and self.backend == "nccl" and flat.device.type != "cuda":
                flat = flat.cuda(self.local_rank)
            torch.distributed.all_reduce(flat, op=reduce_op, group=self.host_group if host else None)
            offset = 0
            for t in ts:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Gradients averaged over the ranks, in place; a parameter without a gradient on this rank
        (e.g. its micro-batch slice was empty) takes part with zeros."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        self.all_reduce_(grads)
        for g in grads:
            g.div_(self.world)

    def check_same(self, what: str, value: str, hint: str = "") -> None:
        """Stop with :class:`DistributedError` when ``value`` (a checksum) differs between ranks."""
        if not self.enabled:
            return
        values = self.all_gather_object(value)
        bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            raise DistributedError(f"{what} differs between ranks: rank 0 has {values[0][:16]}, rank(s) "
                                   f"{', '.join(map(str, bad))} have {', '.join(values[r][:16] for r in bad)}"
                                   f"{'; ' + hint if hint else ''}")


SINGLE = Dist()
DEFAULT_TIMEOUT_MIN = 60.0  # rank 0 evaluates alone while the others wait: long enough for a GSM8K evaluation
# With NCCL the host group waits this long at least (rank 0's evaluation of a 7B model on generation tasks can take
# hours); a dead rank still shows at once (gloo raises when its connection closes), a hung one at the next NCCL
# collective under timeout_min.
HOST_TIMEOUT_MIN = 24 * 60.0
_current: Dist = SINGLE


def current() -> Dist:
    """The process's :class:`Dist` (:data:`SINGLE` until :func:`init` has set up a group)."""
    return _current


def _env_from_submitit() -> None:
    """Inside a submitit SLURM job with several tasks, export torchrun's variables from SLURM's."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # cuda:<local rank> is chosen here; a MASTER_PORT already set is kept, the rest comes from SLURM
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def init(device: torch.device, timeout_min: float | None = None) -> Dist:
    """Join the process group described by the environment (torchrun or submitit/SLURM); a process
    without those variables gets :data:`SINGLE` and no group. ``timeout_min`` (default
    ``$SPEFT_DIST_TIMEOUT_MIN`` or 60): how long a collective waits for a missing rank; it is not part
    of the run's config since it cannot change a result, only how soon a dead rank is noticed."""
    global _current
    timeout_min = timeout_min or float(os.environ.get("SPEFT_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    _env_from_submitit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = SINGLE
        return _current
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    host_group = None
    if backend != "gloo":  # every rank creates it, in the same order
        host_group = torch.distributed.new_group(backend="gloo",
                                                 timeout=timedelta(minutes=max(timeout_min, HOST_TIMEOUT_MIN)))
    _current = Dist(rank=rank, world=world, local_rank=local_rank, backend=backend, host_group=host_group)
    if rank != 0:  # one log: the other ranks report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    log.info("data-parallel run: %d processes (%s)", world, backend)
    return _current


def shutdown() -> None:
    global _current
    if _current.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = SINGLE


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher), before any group exists."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ and (var == "RANK" or os.environ.get("SUBMITIT_EXECUTOR") == "slurm"):
            return int(os.environ[var])
    return 0


def world_size_from_env() -> int:
    """Processes the launch asked for (pre-flight checks, before any group exists)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(dist: Dist, config: dict) -> None:
    """Every rank must run the same resolved config; a mismatch names the keys that differ."""
    if not dist.enabled:
        return
    digests = dist.all_gather_object(config_digest(config))
    if len(set(digests)) == 1:
        return
    configs = dist.all_gather_object(config)
    lines = []
    for r, other in enumerate(configs):
        if digests[r] != digests[0]:
            keys = sorted(k for k in configs[0].keys() | other.keys() if configs[0].get(k) != other.get(k))
            lines.append(f"rank {r} differs from rank 0 in: {', '.join(keys)}")
    raise DistributedError("the ranks were launched with different configs (" + "; ".join(lines) +
                           "); launch every process with the same overrides")


def mask_digest(indices: dict[str, torch.Tensor]) -> str:
    """sha256 of the selected entries, per module in name order (sorted indices)."""
    h = hashlib.sha256()
    for name in sorted(indices):
        idx = torch.sort(indices[name].detach().reshape(-1).long().cpu()).values
        h.update(name.encode())
        h.update(idx.numpy().tobytes())
    return h.hexdigest()


def shard(n: int, rank: int, world: int) -> range:
    """The positions of ``n`` examples that ``rank`` takes: every ``world``-th from ``rank`` (sizes
    differ by at most one). Strided, not contiguous: ``group_by_length`` sorts a micro-batch by length,
    so each rank gets as many long examples as the others."""
    return range(rank, n, world)


def loss_items(row: dict) -> int:
    """What a model's mean loss averages over, in one example: its labelled next-token targets for a
    causal LM (labels after the first that are not :data:`IGNORE_INDEX`), else the example itself."""
    labels = row.get("labels", row.get("label"))
    if labels is None or not hasattr(labels, "__len__") or (torch.is_tensor(labels) and labels.dim() == 0):
        return 1
    return sum(1 for x in list(labels)[1:] if int(x) != IGNORE_INDEX)


class ShardCollate:
    """Collation of this rank's slice of each micro-batch of the global order. The batch carries
    :data:`SHARE`, the slice's fraction of the micro-batch's loss items (examples; labelled tokens for
    a causal LM), so that the share-weighted slice losses sum to the whole micro-batch's mean loss.
    A slice with no example (a last micro-batch smaller than the number of ranks) holds that key only."""

    def __init__(self, collate: Callable[[list[dict]], dict], dist: Dist) -> None:
        self.collate, self.dist = collate, dist

    def __call__(self, rows: list[dict]) -> dict:
        mine = shard(len(rows), self.dist.rank, self.dist.world)
        items = [loss_items(r) for r in rows]
        batch = self.collate([rows[i] for i in mine]) if mine else {}
        batch[SHARE] = sum(items[i] for i in mine) / max(1, sum(items))
        return batch
