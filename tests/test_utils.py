"""The one peak-memory probe: a block's peak (sampled RSS on the CPU) and the process's peak. Measured in a fresh
interpreter: a long-lived test worker's allocator may serve the block from memory it already holds."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT

PROBE = """
import json, time
import numpy as np
from speft.utils import PeakMemory, process_peak_mb

with PeakMemory("cpu") as pm:
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    block.sum()
    time.sleep(0.2)  # 20 sampling periods, the GIL released: the sampler sees it even on a busy machine
    del block
with PeakMemory("cpu") as quiet:
    sum(range(1000))
print(json.dumps({"kind": pm.kind, "delta": pm.delta_mb, "peak": pm.peak_mb, "quiet": quiet.delta_mb,
                  "process": process_peak_mb()}))
"""


def test_a_block_that_holds_200_mb_for_a_moment_peaks_200_mb_above_its_start_and_the_process_knows():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["kind"] == "rss" and 180 <= got["delta"] <= 260, got
    assert got["process"]["rss"] >= got["peak"] - 1 and "cuda_allocated" not in got["process"]
    assert got["quiet"] < 20
