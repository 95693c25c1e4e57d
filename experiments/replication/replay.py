"""Replay committed runs from their own record and compare the metrics exactly.

    python experiments/replication/replay.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds ``.hydra/overrides.yaml`` and ``results.json``. The overrides are run again with
``python run.py`` into a fresh temporary folder (one thread, as the grid), and every final metric must
equal the recorded one bit for bit; exit status 1 otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def replay(run_dir: Path) -> tuple[dict, dict]:
    """(recorded metrics, replayed metrics) of one run."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    recorded = json.loads((run_dir / "results.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "run.py", *overrides, f"hydra.run.dir={tmp}/run"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{run_dir}: the replay failed:\n{proc.stderr[-2000:]}")
        again = json.loads(Path(tmp, "run", "results.json").read_text())
    return recorded["metrics"], again["metrics"]


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    bad = 0
    for raw in argv:
        recorded, again = replay(Path(raw))
        same = recorded == again
        bad += not same
        print(f"{'same' if same else 'DIFFERENT'}: {raw} recorded {recorded} replayed {again}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
