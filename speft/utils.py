"""Small helpers the library's layers share without reaching up to the run's record (``speft.results``):
timing a block, writing a file atomically or as JSON lines, and the one peak-memory probe (a process's peak,
:func:`process_peak_mb`; a block's, :class:`PeakMemory`).

Memory on CUDA is ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache). On the CPU a
process's peak is Linux's ``VmHWM``; a block's is the resident set size (RSS) sampled from ``/proc/self/statm``
every ~10 ms by a background thread, plus once at entry and exit (a spike shorter than the period can be missed).
Without ``/proc`` (macOS) both read ``ru_maxrss``, a peak of the block only when the block sets a new high.
torch is imported only when CUDA is asked about: the report reads results without it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall-clock seconds to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file in the same folder, which is then renamed to ``path``:
    readers never see half a file (results.json, score-cache files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object per line (predictions files, per-problem records); parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: Linux's ``VmHWM`` (the high-water mark of this program's
    own memory), not ``ru_maxrss``, which keeps the peak of the process that forked it across ``exec`` (a run
    launched from a 2 GB test process would report 2 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return round(rss / 1024 if sys.platform != "darwin" else rss / 2**20, 1)


def process_peak_mb(cuda: bool = False) -> dict[str, float]:
    """This process's peak so far: ``rss`` (:func:`peak_rss_mb`) and, when ``cuda``, ``cuda_allocated``."""
    out = {"rss": peak_rss_mb()}
    if cuda:
        import torch

        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


PERIOD_S = 0.01  # the block probe's RSS sampling period


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_mb`` (peak during the block) and
    ``pm.delta_mb`` (peak minus the value at entry), in MiB; ``pm.kind`` is ``cuda_allocated`` or ``rss``."""

    def __init__(self, device=None) -> None:
        self.cuda = str(device or "cpu").startswith("cuda")
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
            return self
        rss = current_rss_mb()
        if rss is None:
            self.start_mb = self.peak_mb = peak_rss_mb()
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
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is None:
            self.peak_mb = peak_rss_mb()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)
