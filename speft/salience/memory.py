"""Peak memory of a block of code (scoring), for ``results.json`` and the benchmark.

On a CUDA device: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only,
not the allocator's cache). On the CPU: the process's resident set size (RSS) sampled from
``/proc/self/statm`` every ~10 ms by a background thread, plus once at entry and exit; a spike shorter
than the period can be missed. Without ``/proc`` (macOS) the process's lifetime high-water mark
``ru_maxrss`` is used, which is a peak of the block only when the block sets a new high.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

PERIOD_S = 0.01


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_mb`` (peak during the block) and
    ``pm.delta_mb`` (peak minus the value at entry), in MiB; ``pm.kind`` is ``cuda_allocated`` or ``rss``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.device(device or "cpu").type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
            return self
        rss = current_rss_mb()
        if rss is None:
            self.start_mb = self.peak_mb = max_rss_mb()
            return self
        self.start_mb = self.peak_mb = rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(PERIOD_S):
            rss = current_rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is None:
            self.peak_mb = max_rss_mb()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)
