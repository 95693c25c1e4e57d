"""Uncertainty for the report: a t interval per cell, and paired comparisons against a reference row.

* :func:`t_halfwidth`: the half-width of the 95 % confidence interval of a mean over seeds,
  t(0.975, n - 1) · s / √n (NaN below two values).
* :func:`paired`: for two methods run on the same (task, seed) pairs, the mean of their differences, a
  95 % percentile bootstrap interval of that mean (pairs resampled with replacement), and the two-sided
  p-value of a paired sign-flip permutation test (under "no difference" each difference's sign is a coin
  flip): exact over all 2^n sign patterns up to :data:`EXACT_MAX` pairs, else Monte Carlo with the
  (count + 1) / (resamples + 1) correction. Seeded: the same input gives the same numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
PERMUTATIONS = 100_000  # Monte Carlo sign flips above EXACT_MAX pairs
EXACT_MAX = 16  # up to 2^16 = 65,536 sign patterns, enumerated
SEED = 0


def t_halfwidth(values: list[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the t confidence interval of the mean of ``values``; NaN for fewer than two."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return math.nan
    return float(t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


@dataclass
class Paired:
    n: int  # matched pairs
    mean: float  # mean difference (row minus reference)
    lo: float  # bootstrap interval of the mean difference
    hi: float
    p: float  # two-sided sign-flip permutation p-value
    exact: bool  # p from every sign pattern (else Monte Carlo)


def bootstrap_interval(diffs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` over ``resamples`` resamples with replacement."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def sign_flip_p(diffs: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED) -> tuple[float, bool]:
    """Two-sided p-value of the paired sign-flip test of mean zero, and whether it is exact."""
    observed = abs(diffs.mean())
    tol = 1e-12 * max(1.0, observed)  # patterns that tie the observed mean count as extreme
    if len(diffs) <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(diffs))))
        return float(np.mean(np.abs(signs @ diffs / len(diffs)) >= observed - tol)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(permutations, len(diffs)))
    extreme = int(np.sum(np.abs(signs @ diffs / len(diffs)) >= observed - tol))
    return (extreme + 1) / (permutations + 1), False


def paired(diffs: list[float], seed: int = SEED) -> Paired:
    """Mean difference, bootstrap interval and sign-flip p-value of matched differences."""
    d = np.asarray(diffs, dtype=float)
    if not len(d):
        return Paired(0, math.nan, math.nan, math.nan, math.nan, True)
    lo, hi = bootstrap_interval(d, seed=seed)
    p, exact = sign_flip_p(d, seed=seed)
    return Paired(len(d), float(d.mean()), lo, hi, p, exact)
