"""Score cache: salience scores saved once, reused by every run that would compute the same ones.

File: ``<paths.cache_dir>/scores/<metric>-<key[:16]>.safetensors``, one fp32 tensor per target module.
Key: sha256 of a canonical JSON (sorted keys) of everything that determines the scores: the model
config (name, source, package, revision, dtype, max_length), the task config, the split (``train``)
and the caps that shape it, the scoring batch size, the metric config (all fields but ``cache`` and
``offload``), the number of scoring examples actually used, the seed, the target names and shapes,
:data:`SCORES_VERSION` (bumped whenever a shared helper's computation changes) and a digest of the
source of the metric's ``score`` method (an edited or replaced metric never reads old scores). The density and the
selection are not in the key, so a sweep over them scores each metric once.

The file's metadata holds the key JSON and a sha256 checksum of the tensors. A file is used only if
its key equals the expected one, its tensors are exactly the targets (names, shapes, fp32), finite
(no NaN) and match the checksum; otherwise, or when it cannot be read, a warning says the cache is
stale or corrupt and the scores are recomputed and the file rewritten (temporary file + rename).

Disable with ``metric.cache=false``. Metrics cheaper than reading a file (``random``, ``magnitude``)
default to ``cache: false`` in their schemas; ``metric.cache=true`` saves theirs too (e.g. for analysis).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speft.distributed import SINGLE, Dist
from speft.models.quantization import weight_shape
from speft.salience.base import SalienceMetric, ScoreContext
from speft.utils import PeakMemory, atomic_write

log = logging.getLogger(__name__)

SCORES_VERSION = 2  # 2: GraSP leaves regression losses untempered (forward_per_example)
EXCLUDED_METRIC_FIELDS = ("cache", "offload")  # change where scores live or whether they are reused, not their values


class StaleCache(ValueError):
    """A cache file that must not be used; the message says why."""


def key_document(metric: SalienceMetric, ctx: ScoreContext, description: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the scores; ``description`` comes from the caller (model, task, data)."""
    cfg = {k: v for k, v in dataclasses.asdict(metric.cfg).items() if k not in EXCLUDED_METRIC_FIELDS}
    return {
        "version": SCORES_VERSION,
        "implementation": implementation(metric),
        "metric": cfg,
        "examples": ctx.num_examples,
        "seed": ctx.seed,
        "targets": {name: list(weight_shape(m)) for name, m in sorted(ctx.targets.items())},
        **description,
    }


def implementation(metric: SalienceMetric) -> str:
    """``module.qualname:digest`` of the metric's ``score`` method (digest of its source text)."""
    fn = type(metric).score
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{fn.__module__}.{fn.__qualname__}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)


def digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc).encode()).hexdigest()


def score_path(cache_dir: Path, metric_name: str, key: str) -> Path:
    return Path(cache_dir) / "scores" / f"{metric_name}-{key[:16]}.safetensors"


def checksum(scores: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(scores):
        t = scores[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save(path: Path, scores: dict[str, torch.Tensor], key_json: str) -> None:
    """Write atomically (:func:`speft.results.atomic_write`)."""
    tensors = {name: s.detach().to("cpu", torch.float32).contiguous() for name, s in scores.items()}
    metadata = {"key": key_json, "checksum": checksum(tensors), "format": f"speft-scores-v{SCORES_VERSION}"}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a score file (no checks)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        return {name: f.get_tensor(name) for name in f.keys()}, metadata


def load(path: Path, key_json: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Verified scores from ``path``; :class:`StaleCache` naming the first failed check otherwise."""
    try:
        scores, metadata = read(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt cache
        raise StaleCache(f"unreadable: {type(e).__name__}: {e}") from None
    if metadata.get("key") != key_json:
        raise StaleCache("its key differs from this run's")
    if set(scores) != set(shapes):
        raise StaleCache(f"its modules {sorted(scores)[:3]}... differ from the targets {sorted(shapes)[:3]}...")
    for name, s in scores.items():
        if tuple(s.shape) != tuple(shapes[name]) or s.dtype != torch.float32:
            raise StaleCache(f"'{name}' is {s.dtype} {tuple(s.shape)}, expected float32 {tuple(shapes[name])}")
        if torch.isnan(s).any():
            raise StaleCache(f"'{name}' holds NaN")
    if metadata.get("checksum") != checksum(scores):
        raise StaleCache("its checksum does not match its content")
    return scores


def compute_scores(metric: SalienceMetric, ctx: ScoreContext, cache_dir: Path | None,
                   description: dict[str, Any], device: torch.device | str | None = None,
                   dist: Dist = SINGLE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Scores from the cache when a valid file exists, else computed (and saved when caching is on).

    Returns the scores and a record for ``results.json``: ``cache`` (``hit``, ``miss`` or ``off``),
    ``path``, ``key``, ``examples`` (examples the metric used), ``peak_memory_mb`` (peak during scoring)
    and ``peak_memory_delta_mb`` (above the level at its start), ``memory_kind`` (``rss``/``cuda_allocated``).

    Data-parallel (``dist``): every rank reads the file; unless all of them hit, all compute together
    (scoring is collective) and rank 0 alone writes the file, which the others wait for.
    """
    use_cache = cache_dir is not None and metric.cfg.cache
    doc = key_document(metric, ctx, description)
    key_json, key = canonical(doc), digest(doc)
    path = score_path(cache_dir, metric.cfg.name, key) if use_cache else None
    info: dict[str, Any] = {"cache": "off", "path": None, "key": key, "examples": metric.examples_used(ctx)}
    with PeakMemory(device) as pm:
        scores = None
        if path is not None:
            info["cache"], info["path"] = "miss", str(path)
            if path.exists():
                shapes = {name: weight_shape(m) for name, m in ctx.targets.items()}
                try:
                    scores = load(path, key_json, shapes)
                    info["cache"] = "hit"
                    log.info("score cache hit: %s", path)
                except StaleCache as e:
                    log.warning("stale or corrupt score cache %s (%s); recomputing", path, e)
        if dist.enabled and path is not None:
            hit = torch.tensor([float(scores is not None)])
            dist.all_reduce_([hit], op="min")
            if not hit.item():
                scores, info["cache"] = None, "miss"
        if scores is None:
            scores = metric.compute(ctx)
            if path is not None:
                if dist.is_main:
                    save(path, scores, key_json)
                    log.info("scores saved to %s", path)
                dist.barrier()
        elif not metric.cfg.offload:
            scores = {name: s.to(ctx.targets[name].weight.device) for name, s in scores.items()}
    info.update(peak_memory_mb=round(pm.peak_mb, 1), peak_memory_delta_mb=round(pm.delta_mb, 1),
                memory_kind=pm.kind)
    return scores, info
