"""Data-parallel runs (speft.distributed) on CPU with gloo: 2 processes score, select and train as one.

Unit checks run 2 ranks with ``torch.multiprocessing.spawn`` on tiny models; the end-to-end checks
launch ``python -m torch.distributed.run --nproc_per_node=2 run.py ...`` on the packaged MiniLM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from speft import distributed, registry
from speft.distributed import Dist, DistributedError, ShardCollate, shard

from .signals import child_env

ROOT = Path(__file__).resolve().parent.parent
METRICS = registry.names("metric")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(n: int = 12, seq: int = 8):
    from .conftest import tiny_batches

    (b,) = tiny_batches(n=n, seq=seq, batch=n)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def collate(rs):
    return {k: torch.stack([r[k] for r in rs]) for k in rs[0]}


def score_all(dist: Dist) -> dict:
    """Every metric's first scores and one re-scoring, on the tiny transformer."""
    from speft.salience.scorer import Scorer

    from .test_salience import make_metric, tiny_bert

    out = {}
    for name in METRICS:
        model, targets = tiny_bert()
        metric = make_metric(name)
        metric.cfg.num_score_examples, metric.cfg.cache = 5, False  # GraSP: 10, halves straddle a batch
        scorer = Scorer(metric, rows(), collate, torch.device("cpu"), batch_size=3, seed=0, dist=dist)
        out[name] = {"first": scorer.score(model, targets), "again": scorer.rescore(model, targets, 7)}
    return out


def cached_twice(dist: Dist, cache_dir: str) -> list[dict]:
    """The score cache's record of two scorings of the same key."""
    from speft.salience.scorer import Scorer

    from .test_salience import make_metric, tiny_bert

    infos = []
    for _ in range(2):
        model, targets = tiny_bert()
        metric = make_metric("grad")
        scorer = Scorer(metric, rows(), collate, torch.device("cpu"), batch_size=3, seed=0, cache_dir=cache_dir,
                        key={"test": 1}, dist=dist)
        scorer.score(model, targets)
        infos.append(scorer.info)
    return infos


def train_tiny(dist: Dist, n: int = 9) -> dict:
    """Train the tiny classifier with the recipe's step (``forward_backward``, ``optimizer_step``): global batch
    4 × 2 accumulation over an epoch of 9 examples (the last micro-batch holds one example, so with 2 ranks one
    slice is empty), 4 optimizer steps, the loss of each step averaged over the ranks as the recipe logs it."""
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from speft.config import TrainerConfig
    from speft.train.loop import forward_backward, optimizer_step

    from .conftest import TinyClassifier

    torch.manual_seed(0)
    model = TinyClassifier()
    cfg = TrainerConfig(name="t", max_steps=4, batch_size=4, grad_accum_steps=2, lr=1e-2, warmup_ratio=0.0,
                        max_grad_norm=0.05, log_every_steps=1)
    col = ShardCollate(collate, dist) if dist.enabled else collate
    loader = DataLoader(rows(n, 6), batch_size=4, shuffle=True, collate_fn=col,
                        generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=0, num_training_steps=cfg.max_steps)
    losses, running, micro, step = [], 0.0, 0, 0
    while step < cfg.max_steps:
        for batch in loader:
            loss = forward_backward(model, batch, cfg, torch.device("cpu"), dist)
            running += 0.0 if loss is None else float(loss)
            micro += 1
            if micro % cfg.grad_accum_steps:
                continue
            step += 1
            optimizer_step(optimizer, scheduler, cfg, step, dist)
            summed = torch.tensor([running], dtype=torch.float64)
            dist.all_reduce_([summed])
            losses.append(summed.item() / cfg.grad_accum_steps)
            running = 0.0
            if step == cfg.max_steps:
                break
    return {"state": model.state_dict(), "loss": losses}


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist = distributed.init(torch.device("cpu"), timeout_min=1)
        if job == "score":
            result = {"scores": score_all(dist), "cache": cached_twice(dist, f"{out}/cache")}
        elif job == "train":
            result = train_tiny(dist)
        elif job == "collectives":
            distributed.BUCKET_ENTRIES = 5  # buckets of 3+1, 4, 10 (alone), 2 entries; float64 apart
            ts = [torch.full((n,), float(rank + 1) * n) for n in (3, 1, 4, 10, 2)]
            ts.append(torch.ones(2, dtype=torch.float64))
            dist.all_reduce_(ts)
            result["sums"] = ts
            for what, call in {
                "config": lambda: distributed.check_same_config(dist, {"seed": rank, "density": "lora:8"}),
                "mask": lambda: dist.check_same("the sparse mask", distributed.mask_digest(
                    {"q": torch.tensor([0, rank + 1])})),
            }.items():
                try:
                    call()
                except DistributedError as e:
                    result[what] = str(e)
        elif job == "dead":
            if rank == 1:
                os._exit(3)  # dies without a word, as a killed process
            try:
                dist.all_reduce_([torch.ones(3)])
            except Exception as e:  # noqa: BLE001 - whatever gloo raises
                result["error"] = f"{type(e).__name__}: {e}"
    except BaseException:  # noqa: BLE001 - report to the test
        result = {"crash": traceback.format_exc()}
    torch.save(result, f"{out}/{rank}.pt")
    if job != "dead":
        distributed.shutdown()


def spawn(job: str, tmp_path, world: int = 2, join: bool = True) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(world, free_port(), job, str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    if join:
        while not ctx.join(timeout=120):
            pass
    else:  # a rank that dies on purpose: wait for the others' files
        for p in ctx.processes:
            p.join(timeout=120)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) if (tmp_path / f"{r}.pt").exists() else {}
               for r in range(world)]
    for r in results:
        assert "crash" not in r, r["crash"]
    return results


@pytest.mark.parametrize("n,world", [(8, 2), (9, 2), (1, 2), (5, 3), (0, 2)])
def test_shards_cover_each_micro_batch_once_in_order(n, world):
    shards = [shard(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_share_weighted_slice_losses_sum_to_the_micro_batch_loss(kind):
    """Slices weighted by their share of the loss items (examples; labelled next tokens for a causal LM,
    whose mean runs over tokens) give exactly the loss one process computes on the whole micro-batch."""
    from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

    from .conftest import TinyClassifier

    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        model, col, rs = TinyClassifier(), collate, rows(5, 6)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))

        class Tok:  # what DataCollatorForSeq2Seq asks of a tokenizer
            pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids", "attention_mask"]

            def pad(self, features, **kw):
                n = max(len(f["input_ids"]) for f in features)
                return {k: torch.tensor([list(f[k]) + [0] * (n - len(f[k])) for f in features])
                        for k in ("input_ids", "attention_mask")}

        col = DataCollatorForSeq2Seq(Tok(), padding=True, label_pad_token_id=-100, return_tensors="pt")
        rs = []
        for length, prompt in [(9, 6), (4, 1), (7, 2), (5, 4), (8, 3)]:  # different labelled-token counts
            ids = torch.randint(1, 40, (length,), generator=g).tolist()
            rs.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    whole = model(**col(rs)).loss
    parts = []
    for r in range(2):
        batch = ShardCollate(col, Dist(rank=r, world=2))(rs)
        share = batch.pop(distributed.SHARE)
        parts.append(share * model(**batch).loss)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=0)


def test_a_single_process_has_no_group_and_no_op_collectives(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    dist = distributed.init(torch.device("cpu"))
    assert dist is distributed.SINGLE and not torch.distributed.is_initialized()
    t = torch.ones(2)
    dist.all_reduce_([t])
    dist.check_same("x", "a")
    assert torch.equal(t, torch.ones(2)) and dist.broadcast_object(5) == 5


def test_a_submitit_slurm_task_exports_torchruns_variables(monkeypatch):
    """hydra/launcher=slurm with 2 nodes × 2 tasks: the 4th task is rank 3, local rank 1, the master is
    the first node of the job's node list."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")  # recorded, so that the teardown removes what the export sets
        monkeypatch.delenv(var)
    for var, value in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_PROCID="3",
                           SLURM_LOCALID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]").items():
        monkeypatch.setenv(var, value)
    assert distributed.world_size_from_env() == 4 and distributed.env_rank() == 3
    distributed._env_from_submitit()
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # the same on every task: seeded by the job id


def test_preflight_refuses_a_batch_that_does_not_split_over_the_processes(monkeypatch, compose_config, tmp_path):
    from speft.pipeline import preflight
    from speft.registry import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"trainer.batch_size=32 .* does not split over 3 processes.*33, 36"):
        preflight(compose_config("logger=none"), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    preflight(compose_config("logger=none"), tmp_path)  # 32 = 2 × 16


def test_two_ranks_score_every_metric_as_one_process_and_select_the_same_mask(tmp_path):
    """Batches dealt round-robin, accumulators summed (mean gradient, per-example squares, both halves
    of GraSP); data-free metrics computed whole on each rank. Ranks agree bit for bit; one process
    agrees up to float summation order, and the selected entries are exactly the same."""
    from speft.masks.selection import select

    results = spawn("score", tmp_path)
    ranks = [r["scores"] for r in results]
    single = score_all(distributed.SINGLE)
    for name in METRICS:
        for when in ("first", "again"):
            one, r0, r1 = single[name][when], ranks[0][name][when], ranks[1][name][when]
            for t in one:
                assert torch.equal(r0[t], r1[t]), (name, when, t)
                torch.testing.assert_close(r0[t], one[t], rtol=1e-5, atol=1e-7 * one[t].abs().max().item())
            k = sum(s.numel() for s in one.values()) // 10
            for mode in ("global", "local"):
                a, b = select(mode, one, k), select(mode, r0, k)
                assert all(torch.equal(a[t].sort().values, b[t].sort().values) for t in a), (name, when, mode)
    # The score cache: computed together and written once by rank 0, then read by every rank.
    assert [[i["cache"] for i in r["cache"]] for r in results] == [["miss", "hit"], ["miss", "hit"]]
    assert len(list((tmp_path / "cache" / "scores").iterdir())) == 1


def test_two_ranks_train_as_one_process_at_the_same_global_batch(tmp_path):
    """Each rank takes its slice of every micro-batch (one slice empty at the epoch's end); gradients
    weighted by examples and averaged before clipping: the same steps as one process."""
    ranks = spawn("train", tmp_path)
    single = train_tiny(distributed.SINGLE)
    for k, v in single["state"].items():
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-5, atol=1e-6)
    from .conftest import TinyClassifier

    assert not torch.equal(single["state"]["q.weight"], TinyClassifier().q.weight)  # it did train
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_ranks_that_disagree_stop_with_an_error_naming_what_differs(tmp_path):
    """And the bucketed all-reduce sums every tensor, whatever its bucket."""
    ranks = spawn("collectives", tmp_path)
    for r in ranks:
        assert [t.tolist() for t in r["sums"]] == [[3.0 * n] * n for n in (3, 1, 4, 10, 2)] + [[2.0, 2.0]]
        assert "rank 1 differs from rank 0 in: seed" in r["config"]
        assert "the sparse mask differs between ranks" in r["mask"]


def test_a_rank_that_dies_makes_the_others_fail(tmp_path):
    ranks = spawn("dead", tmp_path, join=False)
    assert "error" in ranks[0], ranks[0]


# ----------------------------------------------------------------------------------------------
# End to end: torchrun, the packaged MiniLM


FAST = ["debug=fast", "logger=none", "trainer.num_threads=1", "task.max_train_examples=96",
        "task.max_eval_examples=32", "metric.num_score_examples=24", "metric.batch_size=8", "metric.cache=false",
        "mask=reselect", "mask.update_every_steps=2", "mask.num_score_examples=16", "trainer.max_steps=4",
        "trainer.grad_accum_steps=2", "trainer.batch_size=16"]


def launch(run_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300,
           kill: str | None = None) -> subprocess.CompletedProcess:
    """``run.py`` in ``nproc`` processes; ``kill``: a signal after a micro-batch (``tests.signals``)."""
    env = child_env({**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                     "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, kill)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    head = [sys.executable]
    if nproc > 1:
        head += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                 f"--master_port={free_port()}"]
    cmd = [*head, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # two runs of the packaged MiniLM: about 60 s on an idle 2-core box, 90 s on a busy one
def test_torchrun_two_processes_match_one_process_with_a_dynamic_mask(tmp_path):
    """The same initial mask; the reselection at the same step with nearly the same entries (the ranks
    agree on it exactly, checked in the run; against one process the weights differ by dropout's noise,
    drawn per rank), metrics within one example, one results.json and adapter written by rank 0."""
    two = launch(tmp_path / "two", *FAST, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch(tmp_path / "one", *FAST)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["status"] == "completed" and b["mask"] == a["mask"]
    assert b["processes"] == {"world_size": 2, "backend": "gloo", "train_examples": [64, 64]}  # 4 steps × 2 × 16
    assert a["processes"] == {"world_size": 1, "backend": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote no folder of its own
    assert [u["step"] for u in b["mask_updates"]] == [u["step"] for u in a["mask_updates"]] == [2]
    # 2 steps of different dropout noise move a re-scoring that keeps only ~37 % of the entries: 2 % apart
    assert b["mask_updates"][0]["kept"] == pytest.approx(a["mask_updates"][0]["kept"], rel=0.05)
    assert b["train_steps"] == a["train_steps"] == 4
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1 / 32)  # one of 32 examples at most
    from safetensors.torch import load_file

    x, y = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("one", "two"))
    assert x.keys() == y.keys()
    n = [sum(t.numel() for k, t in z.items() if k.endswith(".values")) for z in (x, y)]
    # The delta covers every entry ever selected: the budget plus those the reselection brought in.
    assert n == [r["budget"]["entries"] + r["mask_updates"][0]["changed"] for r in (a, b)]


def test_torchrun_with_a_different_config_on_one_rank_fails_and_records_no_result(tmp_path):
    run = launch(tmp_path / "bad", *FAST, "seed=${oc.env:RANK}", nproc=2)
    assert run.returncode != 0
    data = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert data["status"] == "failed" and data["metrics"] == {}
    assert "rank 1 differs from rank 0 in: seed" in data["error"]["message"]


# Exact resume with 2 processes: a SIGKILL of both ranks right after a reselection (slow), and SLURM's
# warning reaching one rank only, which both ranks heed at the same step boundary.
RESUME = {"sigkill_both_after_update": ("5:SIGKILL", "SIGKILL"), "sigusr1_rank1_only": ("3:SIGUSR1:1", "SIGUSR1")}


@pytest.mark.parametrize("case", [pytest.param("sigkill_both_after_update", marks=pytest.mark.slow),
                                  "sigusr1_rank1_only"])
def test_two_processes_resume_bit_for_bit(case, tmp_path, monkeypatch):
    from speft.train import checkpoint

    kill, sig = RESUME[case]
    overrides = [*FAST, "trainer.checkpoint_every_steps=1"]
    reference = launch(tmp_path / "reference", *overrides, nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = launch(tmp_path / "run", *overrides, nproc=2, kill=kill)
    assert killed.returncode != 0
    saved = [s for s, _ in checkpoint.checkpoints(tmp_path / "run")]
    content = checkpoint.load(checkpoint.path_of(tmp_path / "run", saved[-1]))
    assert len(content["loop"]["ranks"]) == 2  # both ranks' random streams, written by rank 0
    if sig == "SIGUSR1":  # micro-batch 3 is in step 2: both ranks finish it, rank 0 checkpoints, both stop
        data = json.loads((tmp_path / "run" / "results.json").read_text())
        assert data["status"] == "interrupted" and data["interrupted"]["step"] == 2 == saved[-1]
        assert data["interrupted"]["signal"] == "SIGUSR1"
    else:  # killed in step 3, after the reselection of step 2
        assert saved[-1] == 2 and not (tmp_path / "run" / "results.json").exists()
    again = launch(tmp_path / "run", *overrides, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("reference", "run"))
    assert b["resumed_from_steps"] == [2]
    for key in ("metrics", "best_metrics", "history", "mask", "train_steps"):
        assert b[key] == a[key], key
    assert [{k: v for k, v in u.items() if k != "seconds"} for u in b["mask_updates"]] == \
        [{k: v for k, v in u.items() if k != "seconds"} for u in a["mask_updates"]]
    x, y = ((tmp_path / d / "adapter" / "adapter.safetensors").read_bytes() for d in ("reference", "run"))
    assert x == y


def test_under_nccl_host_data_takes_the_gloo_group_and_device_data_the_default_one(monkeypatch):
    """No NCCL here: the collectives are recorded, not run. Flags, objects and the wait for rank 0's evaluation go
    through the host (gloo) group with no copy to the GPU; gradients and score buffers through the default group."""
    from speft.train.loop import CheckpointClock

    calls = []
    fake = torch.distributed
    monkeypatch.setattr(fake, "all_reduce", lambda t, op=None, group=None: calls.append(("reduce", t.device.type,
                                                                                          group)))
    monkeypatch.setattr(fake, "all_gather_object", lambda out, obj, group=None: calls.append(("gather", group)))
    monkeypatch.setattr(fake, "broadcast_object_list", lambda box, src=0, group=None: calls.append(("bcast", group)))
    monkeypatch.setattr(fake, "barrier", lambda group=None: calls.append(("barrier", group)))
    host = object()
    dist = Dist(rank=0, world=2, backend="nccl", host_group=host)
    CheckpointClock().decide(True, dist)  # the per-step flags
    dist.all_gather_object("digest")
    dist.broadcast_object(("ok", {"accuracy": 1.0}))  # rank 0's evaluation, the others waiting
    dist.barrier()
    assert calls == [("reduce", "cpu", host), ("gather", host), ("bcast", host), ("barrier", host)]
    calls.clear()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda t, device=None: calls.append(("to GPU", device)) or t.clone())
    dist.all_reduce_([torch.ones(3)])  # e.g. offloaded score buffers: reduced on the GPU under NCCL
    assert calls == [("to GPU", 0), ("reduce", "cpu", None)]
