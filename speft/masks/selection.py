"""Exact top-k selection of entries across (global) or within (local) target modules.

The global top-k never concatenates the scores. A radix select over the float32 order finds the k-th
largest score in four counting passes (8 bits each, a 256-bin histogram per pass), reading every
module in fixed-size chunks, so the extra memory is a few chunk-sized buffers whatever the model
size. Every entry above that score is kept and ties at it are filled in a fixed order (module order,
then flat index), so the result is exactly k entries and deterministic; it equals
concatenate-and-top-k with the same tie rule.
"""

from __future__ import annotations

import math

import torch

from speft.registry import ConfigError

CHUNK = 1 << 20  # entries per chunk: bounds the temporary buffers (a few tens of MB) on any model
_SIGN = 1 << 31


def ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) in the same order as the float32 scores (IEEE-754 trick).

    -0.0 and 0.0 get the same key (they compare equal)."""
    bits = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | _SIGN)


def _chunks(scores: torch.Tensor):
    flat = scores.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, ordered_keys(flat[start : start + CHUNK])


def _check(scores: dict[str, torch.Tensor], k: int) -> int:
    total = sum(s.numel() for s in scores.values())
    if not 1 <= k <= total:
        raise ConfigError(f"cannot select {k} entries out of {total}")
    if scores:  # one host transfer for every module's check (a CUDA sync each would stall the device)
        device = next(iter(scores.values())).device
        nan = torch.stack([torch.isnan(s).any().to(device) for s in scores.values()]).tolist()
        bad = [name for name, flag in zip(scores, nan) if flag]
        if bad:
            raise ValueError(f"salience scores of '{bad[0]}' contain NaN")
    return total


def kth_largest_key(scores: dict[str, torch.Tensor], k: int) -> int:
    """The key of the k-th largest score (radix select, most significant byte first)."""
    prefix, rank = 0, k  # rank: position of the wanted key among entries sharing the prefix
    for shift in (24, 16, 8, 0):
        hist = None
        for s in scores.values():
            for _, keys in _chunks(s):
                if shift < 24:
                    keys = keys[(keys >> (shift + 8)) == prefix]
                h = torch.bincount((keys >> shift) & 0xFF, minlength=256)  # on the scores' device
                hist = h if hist is None else hist + h.to(hist.device)
        hist = hist.cpu()  # 256 counts: one host transfer per pass, not one per chunk
        above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[d] = count of digits >= d
        digit = int((above >= rank).nonzero().max())
        rank -= int(above[digit + 1]) if digit < 255 else 0
        prefix = (prefix << 8) | digit
    return prefix


def select_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices (sorted, int64) of the k highest scores over all modules."""
    _check(scores, k)
    t = kth_largest_key(scores, k)
    above, ties = {}, {}
    for name, s in scores.items():
        a, e = [], []
        for start, keys in _chunks(s):
            a.append((keys > t).nonzero().flatten() + start)
            e.append((keys == t).nonzero().flatten() + start)
        above[name], ties[name] = torch.cat(a), torch.cat(e)
    remaining = k - sum(len(i) for i in above.values())
    out = {}
    for name in scores:  # ties at t, filled in module order then index order
        take = ties[name][: max(remaining, 0)]
        remaining -= len(take)
        out[name] = torch.sort(torch.cat([above[name], take])).values
    return out


def local_counts(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Split k over modules in proportion to their sizes; exactly k in total (largest remainders)."""
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    short = k - sum(counts.values())
    for n in sorted(sizes, key=lambda n: (counts[n] - exact[n], list(sizes).index(n)))[:short]:
        counts[n] += 1
    return counts


def budget_counts(shapes: dict[str, tuple[int, ...]], k: int, kind: str = "fraction", rank: int = 0) -> dict[str, int]:
    """Per-module counts of a local selection of k entries, by the budget's form (the released code's rule,
    ``model/sparse_peft.py``, ``update_linear_sparse``, with the LoRA form added):

    * ``fraction``: the same density in every module (counts in proportion to module size);
    * ``count``: every module the same count, k / modules (the first k mod modules get one more);
    * ``lora``: every module LoRA's own count at rank r, r·(in + out) (these sum to k).
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if kind == "lora":
        counts = {n: rank * (s[0] + s[-1]) for n, s in shapes.items()}
        if sum(counts.values()) != k:
            raise ConfigError(f"lora:{rank} gives {sum(counts.values())} entries on these modules, not {k}")
    elif kind == "count":
        q, extra = divmod(k, len(shapes))
        counts = {n: q + (i < extra) for i, n in enumerate(shapes)}
    else:
        return local_counts(sizes, k)
    small = [f"{n} ({counts[n]:,} > {sizes[n]:,})" for n in shapes if counts[n] > sizes[n]]
    if small:
        raise ConfigError(f"local selection with density as a {kind} gives some modules more entries than they "
                          f"hold: {', '.join(small)}; use mask.selection=global or a fraction")
    return counts


def select_local(scores: dict[str, torch.Tensor], k: int, kind: str = "fraction", rank: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Each module keeps its own top entries; how many per module follows the budget's form
    (:func:`budget_counts`; k in total)."""
    _check(scores, k)
    counts = budget_counts({n: tuple(s.shape) for n, s in scores.items()}, k, kind, rank)
    return {n: select_global({n: s}, counts[n])[n] if counts[n] else torch.empty(0, dtype=torch.long)
            for n, s in scores.items()}


def _select_global(scores: dict[str, torch.Tensor], k: int, kind: str = "fraction", rank: int = 0
                   ) -> dict[str, torch.Tensor]:
    return select_global(scores, k)  # the budget's form does not matter: one top-k over all modules


SELECTIONS = {"global": _select_global, "local": select_local}


def select(selection: str, scores: dict[str, torch.Tensor], k: int, budget=None) -> dict[str, torch.Tensor]:
    """Indices of ``k`` entries by ``selection`` (global | local); ``budget`` (a ``speft.config.Budget``, None:
    a fraction) sets a local selection's per-module counts by its form."""
    kind = budget.kind if budget is not None else "fraction"
    return SELECTIONS[selection](scores, k, kind, int(budget.value) if kind == "lora" else 0)

