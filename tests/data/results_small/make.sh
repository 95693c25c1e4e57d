#!/usr/bin/env bash
# Regenerates tests/data/results_small: 20 tiny runs (debug=fast: 5 steps of 16 examples, 64 evaluation
# examples) of the packaged MiniLM on SST-2 and RTE, shaped for speft.report's tests and the notebooks,
# plus overlap.json (the IoU of four metrics' selections). About 15 minutes on 2 busy CPU cores.
#
#   metrics/         grad, snip x SST-2, RTE x seeds 1, 2 (static mask, global selection, lora:8)   8 runs
#   masks_static/    grad on SST-2, static mask, local selection, seeds 1, 2                          2 runs
#   masks_reselect/  grad on SST-2, reselect (every 2 steps) x global, local, seeds 1, 2              4 runs
#   density/         grad on SST-2 at lora:2 and lora:32, seed 1 (lora:8 is in metrics/)              2 runs
#   lora/            LoRA rank 2 and 8 on SST-2, seed 1                                               2 runs
#   failed/          two genuine failures, recorded by the runs themselves (status "failed", error):   2 runs
#                    RTE read with task.source=local from an empty data folder, a DataError naming
#                    the missing file: grad seed 3 (its cell: 2 completed + 1 failed) and LoRA (its
#                    RTE cell: failed only).
#
# Kept per run: results.json without the bulky `history` and `versions`; `.hydra/`, run.log and
# multirun.yaml are removed. Score files are not kept (scoring.path points to a deleted temporary
# cache): the overlap figure reads overlap.json, written here from the scores before they are deleted.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=tests/data/results_small
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export SPEFT_CACHE_DIR=$TMP/cache WANDB_MODE=disabled
COMMON="debug=fast logger=none method.save_adapter=false trainer.batch_size=16"
rm -rf $OUT/metrics $OUT/masks_static $OUT/masks_reselect $OUT/density $OUT/lora $OUT/failed $OUT/overlap.json

python run.py -m $COMMON task=glue/sst2,glue/rte metric=grad,snip seed=1,2 hydra.sweep.dir=$OUT/metrics
python run.py -m $COMMON task=glue/sst2 metric=grad mask.selection=local seed=1,2 hydra.sweep.dir=$OUT/masks_static
python run.py -m $COMMON task=glue/sst2 metric=grad mask=reselect mask.update_every_steps=2 \
  mask.selection=global,local seed=1,2 hydra.sweep.dir=$OUT/masks_reselect
python run.py -m $COMMON task=glue/sst2 metric=grad density=lora:2,lora:32 seed=1 hydra.sweep.dir=$OUT/density
python run.py -m $COMMON task=glue/sst2 method=lora method.rank=2,8 seed=1 hydra.sweep.dir=$OUT/lora
# The failures: each run writes its own results.json with status "failed", then exits non-zero.
mkdir -p "$TMP/empty"
python run.py $COMMON task=glue/rte task.source=local paths.data_dir="$TMP/empty" metric=grad seed=3 \
  hydra.run.dir=$OUT/failed/0 || true
python run.py $COMMON task=glue/rte task.source=local paths.data_dir="$TMP/empty" method=lora seed=1 \
  hydra.run.dir=$OUT/failed/1 || true

# Overlap of four metrics' selections on SST-2 (seed 1): grad and snip from their runs, magnitude and
# fisher scored by two throw-away runs (magnitude's cache is off by default).
python run.py -m $COMMON task=glue/sst2 metric=magnitude,fisher metric.cache=true seed=1 hydra.sweep.dir=$TMP/extra
python - "$OUT" "$TMP" <<'PY'
import json, subprocess, sys
from pathlib import Path
out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
def runs(root):
    return {(r["config"]["task"]["name"], r["config"]["metric"]["name"], r["config"]["seed"]): p.parent
            for p in sorted(root.rglob("results.json")) for r in [json.loads(p.read_text())]}
found = {**runs(out / "metrics"), **runs(tmp / "extra")}
inputs = [str(found[("glue/sst2", m, 1)]) for m in ("grad", "snip", "magnitude", "fisher")]
subprocess.run([sys.executable, "-m", "speft.report.overlap", "--density", "lora:8", "--selection", "global",
                "--json", str(out / "overlap.json"), *inputs], check=True)
record = json.loads((out / "overlap.json").read_text())  # sources: paths relative to the repository
record["sources"] = [s if s.startswith(str(out)) else f"(a throw-away run of {label})"
                     for s, label in zip(record["sources"], record["labels"])]
(out / "overlap.json").write_text(json.dumps(record, indent=1) + "\n")
PY

# Shrink: drop history and versions, Hydra's folders and logs; check the statuses.
python - "$OUT" <<'PY'
import json, shutil, sys
from collections import Counter
from pathlib import Path
out = Path(sys.argv[1])
for d in out.rglob(".hydra"):
    shutil.rmtree(d)
for pattern in ("run.log", "multirun.yaml", "*.log"):
    for f in out.rglob(pattern):
        f.unlink()
statuses = Counter()
for p in sorted(out.rglob("results.json")):
    r = json.loads(p.read_text())
    for key in ("history", "versions"):
        r.pop(key, None)
    p.write_text(json.dumps(r, indent=1) + "\n")
    statuses[r["status"]] += 1
print(dict(statuses))
assert statuses == {"completed": 18, "failed": 2}, statuses
PY
du -sh $OUT
