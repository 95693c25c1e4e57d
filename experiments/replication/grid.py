"""The replication's grid: every run of every stage, launched two at a time, skipping completed ones.

    python experiments/replication/grid.py [--stages tune,a,warmup,b,density,lm] [--jobs 2] [--dry-run]

Environment (all optional): ``TASKS`` (comma-separated task options), ``SEEDS`` (e.g. ``1,2,3``),
``OUT`` (the runs' root), ``DATA`` (``paths.data_dir``), ``TASKS_B`` (Table B's tasks),
``DENSITY_TASK`` (the density panel's task). Each run is one ``python run.py experiment=replication ...``
into its own folder ``<OUT>/<stage>/<task>/<cell>/<seed or lr>/``; its ``.hydra/overrides.yaml`` replays it.

Stages, in the order they run:

* ``tune``: every method's learning rate, from a small grid (×5 apart, extended by ×5 steps while the
  best value is at an end), on 500 examples held out of the training data (``task.heldout_examples``;
  never the reported dev set), seed ``TUNE_SEED``; the chosen values are written to ``<OUT>/lr.json``.
* screen (after a task's tuning, ``<OUT>/screen.json``): the best held-out score of the methods at their chosen
  rates against the held-out majority class; a task not 5 points above it (a correlation: not 10) "does not
  separate" and runs none of the stages below (the tables' rule, applied before spending their compute).
* ``a``: Table A, every metric (static, global) and the baselines at the tuned learning rates, every seed.
* ``warmup``: the protocol switch ``trainer.head_warmup_steps=20`` (salience scored through a trained
  head) for ``grad``, ``magnitude``, ``random`` and LoRA.
* ``b``: Table B, ``grad`` and ``fisher`` × {static, dynamic (the paper's re-selection every 20 steps:
  4 times in 94), regrow (every 20 steps until 75 %: 3 times)} × {global, local}.
* ``density``: ``grad``, ``random`` and LoRA at lora:1, lora:4, lora:8 and lora:32 on one task.
* ``lm``: SmolLM2-135M on GSM8K-train, ``grad``, ``magnitude``, ``random`` and LoRA at one budget,
  scored by the reference solutions' token NLL on held-out test problems and by exact match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

METRICS = ("random", "magnitude", "grad", "snip", "force", "taylor_fo", "synflow", "grasp", "fisher")
BASELINES = ("lora", "pissa", "dora", "full", "head_only")
# Learning-rate grids (×5 apart): the adapters and sparse deltas share one; full fine-tuning moves every
# weight and takes smaller steps. head_only trains the head alone, at the head learning rate shared by all.
LR_GRID = {"peft": (2e-4, 1e-3, 5e-3), "full": (1e-5, 5e-5, 2.5e-4)}
EXTEND = 2  # while the best value sits at an end of the tried ones, try up to 2 more ×5 steps past it
SEEDS = "1,2,3"  # seeds per cell (env SEEDS replaces them): three, as the study's tables
TUNE_SEED = 1  # the tuning runs' seed (the held-out split is the same for every seed)
HELDOUT = 500  # training examples held out for tuning, disjoint from the 1,000-example training subset
TASKS = "glue/sst2,glue/mrpc,glue/stsb,rotten_tomatoes"
STAGES = ("tune", "a", "warmup", "b", "density", "lm")
TASKS_B = "glue/sst2,glue/stsb"  # Table B's tasks (env TASKS_B replaces them), those that separate among them
B_METRICS = ("grad", "fisher")  # the grad and one other gradient metric
SELECTIONS = ("global", "local")  # Table B's top-k: over all targets, or per module
# Table B: the paper's re-selection and drop-and-grow, each firing at least 3 times in 94 steps
SCHEDULES = {"static": [], "dynamic": ["mask=dynamic", "mask.mode=paper", "mask.update_every_steps=20",
                                       "mask.num_score_examples=256"],
             "regrow": ["mask=regrow", "mask.update_every_steps=20"]}
# The causal-LM panel: 32 steps of 4 GSM8K-train problems (≤ 256 tokens), then the reference solutions'
# token NLL on the first 64 test problems and zero-shot exact match on the first 8 (~5 minutes a run here).
LM = ["model=smollm2_135m", "task=gsm8k", "task.max_train_examples=256", "task.subset_seed=0",
      "task.max_length=256", "trainer.max_steps=32", "trainer.batch_size=4", "trainer.grad_accum_steps=1",
      "trainer.lr=1e-4", "task.evaluation=nll", "task.max_eval_examples=64", "task.generate_examples=8",
      "task.num_fewshot=0", "task.eval_batch_size=8", "metric.num_score_examples=32", "density=lora:8"]


def method_overrides(key: str) -> list[str]:
    """A Table A row's overrides: ``sparse-<metric>`` or a baseline method."""
    if key.startswith("sparse-"):
        return ["method=sparse", f"metric={key.removeprefix('sparse-')}"]
    return [f"method={key}"]


def lr_grid(key: str) -> tuple[float, ...]:
    return LR_GRID["full"] if key == "full" else LR_GRID["peft"]


@dataclass
class Run:
    folder: Path
    overrides: list[str]

    def command(self) -> list[str]:
        return [sys.executable, "run.py", "experiment=replication", *self.overrides,
                f"hydra.run.dir={self.folder}"]

    def done(self) -> bool:
        """A completed result of exactly these overrides (run.py re-checks the whole config)."""
        try:
            result = json.loads((self.folder / "results.json").read_text())
            recorded = (self.folder / ".hydra" / "overrides.yaml").read_text()
        except (OSError, ValueError):
            return False
        import yaml

        return result.get("status") == "completed" and yaml.safe_load(recorded) == ["experiment=replication",
                                                                                      *self.overrides]


class Grid:
    def __init__(self, out: Path, tasks: list[str], seeds: list[int], data: str | None,
                 tasks_b: list[str], density_task: str) -> None:
        self.out, self.tasks, self.seeds, self.tasks_b, self.density_task = out, tasks, seeds, tasks_b, density_task
        self.data = data
        self.common = [f"paths.data_dir={data}"] if data else []
        self.table_a = [f"sparse-{m}" for m in METRICS] + list(BASELINES)

    def run(self, *parts: str, overrides: list[str]) -> Run:
        return Run(self.out.joinpath(*(p.replace("/", "-") for p in parts)), [*self.common, *overrides])

    # -- stages -----------------------------------------------------------------------------------

    def tune_run(self, task: str, key: str, lr: float) -> Run:
        return self.run("tune", task, key, f"lr{lr:g}", overrides=[
            f"task={task}", *method_overrides(key), f"trainer.lr={lr}", f"task.heldout_examples={HELDOUT}",
            f"seed={TUNE_SEED}"])

    def tune_scores(self, task: str, key: str, lrs: list[float]) -> dict[float, float]:
        """Held-out main metric of the completed tuning runs among ``lrs`` (NaN counts as the worst)."""
        scores = {}
        for lr in lrs:
            run = self.tune_run(task, key, lr)
            if run.done():
                r = json.loads((run.folder / "results.json").read_text())
                value = r["metrics"].get(r["main_metric"], float("nan"))
                scores[lr] = -math.inf if math.isnan(value) else value
        return scores

    def tune_lrs(self, task: str, key: str) -> tuple[list[float], float | None]:
        """The learning rates to try (the grid, extended by ×5 steps while the best is at an end, at most
        ``EXTEND`` times) and the chosen one (None until every value tried has a result)."""
        lrs = list(lr_grid(key))
        for extension in range(EXTEND + 1):
            scores = self.tune_scores(task, key, lrs)
            if len(scores) < len(lrs):
                return lrs, None
            best = max(sorted(lrs), key=lambda lr: scores[lr])  # ties: the smaller step
            if extension == EXTEND or min(lrs) < best < max(lrs):
                return lrs, best
            lrs = [*lrs, round(best * 5, 12)] if best == max(lrs) else [round(best / 5, 12), *lrs]
        return lrs, None

    def tune(self) -> list[Run]:
        return [self.tune_run(task, key, lr) for task in self.tasks for key in self.table_a if key != "head_only"
                for lr in self.tune_lrs(task, key)[0]]

    def chosen_lr(self) -> dict[str, dict[str, float]]:
        """{task: {method key: learning rate}}: the best held-out main metric of each (extended) tuning grid."""
        path = self.out / "lr.json"
        table: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}
        for task in self.tasks:
            for key in self.table_a:
                if key != "head_only" and (chosen := self.tune_lrs(task, key)[1]) is not None:
                    table.setdefault(task, {})[key] = chosen
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        return table

    def screen(self) -> dict[str, dict]:
        """After a task's tuning: its best held-out main metric over the methods at their chosen rates against the
        held-out majority class, and whether it separates (the tables' rule, applied early); ``screen.json``."""
        from tables import majority_scores, separates

        path = self.out / "screen.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        for task in self.tasks:
            chosen = {key: self.tune_lrs(task, key)[1] for key in self.table_a if key != "head_only"}
            if task in done or any(lr is None for lr in chosen.values()):
                continue  # screened already, or still tuning
            scores = {key: 100 * self.tune_scores(task, key, [lr])[lr] for key, lr in chosen.items()}
            best = max(scores, key=scores.get)
            majority = majority_scores([task], self.data, (f"task.heldout_examples={HELDOUT}",))[task]
            done[task] = {"best_key": best, "best": round(scores[best], 2),
                          "majority": None if math.isnan(majority) else round(majority, 2),
                          "separates": separates(scores[best], majority)}
        path.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
        return done

    def kept(self, tasks: list[str], stage: str) -> list[str]:
        """The tasks the screen lets into a later stage (a task still tuning waits)."""
        screened = self.screen()
        for task in tasks:
            if task not in screened:
                print(f"[grid] {stage}/{task}: tuning not complete; skipped", flush=True)
            elif not screened[task]["separates"]:
                print(f"[grid] {stage}/{task}: does not separate at the tuning stage (screen.json); skipped",
                      flush=True)
        return [t for t in tasks if screened.get(t, {}).get("separates")]

    def lr_overrides(self, task: str, key: str) -> list[str] | None:
        if key == "head_only":
            return []
        lr = self.lr.get(task, {}).get(key)
        return None if lr is None else [f"trainer.lr={lr}"]

    def cells(self, stage: str, task: str, key: str, cell: str, extra: list[str]) -> list[Run]:
        lr = self.lr_overrides(task, key)
        if lr is None:
            print(f"[grid] {stage}/{task}/{cell}: no tuned learning rate yet (stage tune); skipped", flush=True)
            return []
        return [self.run(stage, task, cell, f"seed{s}",
                         overrides=[f"task={task}", *method_overrides(key), *lr, *extra, f"seed={s}"])
                for s in self.seeds]

    def a(self) -> list[Run]:  # seed-major: a partial grid holds whole seeds
        runs = [r for task in self.kept(self.tasks, "a") for key in self.table_a
                for r in self.cells("a", task, key, key, [])]
        return sorted(runs, key=lambda r: r.folder.name)

    def warmup(self) -> list[Run]:
        keys = ("sparse-grad", "sparse-magnitude", "sparse-random", "lora")
        runs = [r for task in self.kept(self.tasks, "warmup") for key in keys
                for r in self.cells("warmup", task, key, key, ["trainer.head_warmup_steps=20"])]
        return sorted(runs, key=lambda r: r.folder.name)

    def b(self) -> list[Run]:
        runs = []
        for task in self.kept(self.tasks_b, "b"):
            for metric in B_METRICS:
                for schedule, extra in SCHEDULES.items():
                    for selection in SELECTIONS:
                        if (schedule, selection) == ("static", "global"):
                            continue  # Table A's cell
                        runs += self.cells("b", task, f"sparse-{metric}", f"{metric}-{schedule}-{selection}",
                                           [*extra, f"mask.selection={selection}"])
        return sorted(runs, key=lambda r: r.folder.name)

    def density(self) -> list[Run]:
        runs = []
        for task in self.kept([self.density_task], "density"):
            for key in ("sparse-grad", "sparse-random", "lora"):
                for r in (1, 4, 32):  # lora:8 is Table A's
                    rank = [f"method.rank={r}"] if key == "lora" else []
                    runs += self.cells("density", task, key, f"{key}-lora{r}", [f"density=lora:{r}", *rank])
        return sorted(runs, key=lambda r: r.folder.name)

    def lm(self) -> list[Run]:
        runs = [self.run("lm", "gsm8k", key, f"seed{s}", overrides=[*method_overrides(key), *LM, f"seed={s}"])
                for s in self.seeds for key in ("sparse-grad", "sparse-magnitude", "sparse-random", "lora")]
        return runs

    def stage(self, name: str) -> list[Run]:
        if name != "tune":
            self.lr = self.chosen_lr()
        return getattr(self, name)()


def launch(runs: list[Run], jobs: int, log_dir: Path) -> list[Run]:
    """Run what is not done yet, ``jobs`` at a time; returns the runs that failed."""
    todo = [r for r in runs if not r.done()]
    print(f"[grid] {len(runs) - len(todo)} of {len(runs)} done; running {len(todo)}", flush=True)
    failed: list[Run] = []

    def one(run: Run) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        # stderr to a file, not a pipe: a run outlives an interrupted driver without a broken pipe
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(run.command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
            err.seek(0)
            status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}): {err.read().strip()[-400:]}"
        with open(log_dir / "grid.log", "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {time.time() - t0:6.1f}s {run.folder} {status}\n")
        if proc.returncode:
            failed.append(run)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--dry-run", action="store_true", help="list the runs not done yet and stop")
    args = p.parse_args()
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    env = os.environ.get
    out = Path(env("OUT") or HERE / "runs").resolve()
    tasks = (env("TASKS") or TASKS).split(",")
    grid = Grid(out, tasks, [int(s) for s in (env("SEEDS") or SEEDS).split(",")], env("DATA"),
                (env("TASKS_B") or TASKS_B).split(","), env("DENSITY_TASK") or "glue/sst2")
    out.mkdir(parents=True, exist_ok=True)
    for name in stages:
        runs = grid.stage(name)
        if args.dry_run:
            todo = [r for r in runs if not r.done()]
            print(f"{name}: {len(runs)} runs, {len(todo)} to do")
            for r in todo:
                print("  ", " ".join(r.command()[1:]))
            continue
        print(f"[grid] stage {name}: {len(runs)} runs", flush=True)
        while True:  # tune: each round's results may extend a learning-rate grid
            failed = launch(runs, args.jobs, out)
            if failed:
                print(f"[grid] stage {name}: {len(failed)} failed (see {out / 'grid.log'} and their results.json)")
            more = grid.stage(name)
            if failed or {str(r.folder) for r in more} <= {str(r.folder) for r in runs}:
                break
            runs = more
    if not args.dry_run and "tune" in stages:
        grid.chosen_lr()


if __name__ == "__main__":
    main()
