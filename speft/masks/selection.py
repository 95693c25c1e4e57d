"""Exact top-k selection of entries across (global) or within (local) target modules.

The global top-k never concatenates the scores: a bisection over the float32 order finds the k-th
largest score with one counting pass per step (extra memory: one module's scores), then every entry
above it is kept and ties at it are filled in a fixed order (module order, then flat index), so the
result is exactly k entries and deterministic. It equals concatenate-and-top-k with the same tie rule.
"""

from __future__ import annotations

import torch

from speft.registry import ConfigError

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the same order as the float32 scores (IEEE-754 trick)."""
    # + 0.0 turns -0.0 into 0.0 so the two zeros tie, as they compare equal
    bits = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ _INT32_MAX, bits)


def _check(scores: dict[str, torch.Tensor], k: int) -> int:
    total = sum(s.numel() for s in scores.values())
    if not 1 <= k <= total:
        raise ConfigError(f"cannot select {k} entries out of {total}")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"salience scores of '{name}' contain NaN")
    return total


def kth_largest_key(scores: dict[str, torch.Tensor], k: int) -> int:
    """Largest key t with at least k entries whose key >= t."""
    lo, hi = _INT32_MIN, _INT32_MAX  # count(>= lo) >= k always holds; search the largest such t
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = sum(int((sortable_keys(s) >= mid).sum()) for s in scores.values())
        if count >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices (sorted, int64) of the k highest scores over all modules."""
    _check(scores, k)
    t = kth_largest_key(scores, k)
    above = {n: (sortable_keys(s) > t).nonzero().flatten() for n, s in scores.items()}
    remaining = k - sum(len(i) for i in above.values())
    out = {}
    for name, s in scores.items():  # ties at t, filled in module order then index order
        ties = (sortable_keys(s) == t).nonzero().flatten()[: max(remaining, 0)]
        remaining -= len(ties)
        out[name] = torch.sort(torch.cat([above[name], ties])).values
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


def select_local(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each module keeps its own top entries, the same density everywhere (k in total)."""
    _check(scores, k)
    counts = local_counts({n: s.numel() for n, s in scores.items()}, k)
    return {n: select_global({n: s}, counts[n])[n] if counts[n] else torch.empty(0, dtype=torch.long)
            for n, s in scores.items()}


SELECTIONS = {"global": select_global, "local": select_local}
