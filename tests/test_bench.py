"""The efficiency benchmark runs every method in its own process at equal trainable counts, on random
or real-gradient masks, and reports the sparse backward's structured fraction."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from speft.models.loading import find_targets
from speft.tools.bench import build, configurations, grad_masks, main, parse_args, scoring_setup, structure

TINY = ["--shape", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0", "--device", "cpu"]
# LoRA rank r on q,k,v,o,gate,up,down of 2 tiny layers: r·(in+out) summed
TINY_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]


def lora_count(r: int) -> int:
    return r * 2 * sum(o + i for o, i in TINY_SHAPES)


@pytest.fixture(scope="module")
def default_bench(tmp_path_factory):
    """One bench of every method (their worker processes take seconds each): its rows, its JSON lines on stdout
    and its --table file."""
    table = tmp_path_factory.mktemp("bench") / "table.md"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rows = main([*TINY, "--rank", "2", "--table", str(table)])
    return rows, out.getvalue(), table.read_text(encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path):
    """Six GSM8K-style rows (the grad mask's real text) in the paths.data_dir layout."""
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in [(3, 4), (10, 5), (7, 7), (12, 1), (2, 9), (6, 8)]]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_configurations_measure_full_and_frozen_once_and_each_rank_and_mask():
    args = parse_args([*TINY, "--rank", "2,3", "--mask", "random,grad"])
    assert configurations(args) == [("full", 2, None), ("frozen", 2, None), ("lora", 2, None),
                                    ("sparse", 2, "random"), ("sparse", 2, "grad"), ("lora", 3, None),
                                    ("sparse", 3, "random"), ("sparse", 3, "grad")]
    args = parse_args([*TINY, "--rank", "4", "--methods", "sparse,frozen"])
    assert configurations(args) == [("frozen", 4, None), ("sparse", 4, "random")]


def test_bench_reports_every_method_with_matched_counts_and_ratios(default_bench):
    rows, stdout, _ = default_bench
    assert [json.loads(line) for line in stdout.strip().splitlines()] == rows  # one JSON line per configuration
    key = [(r["method"], r.get("rank"), r.get("mask")) for r in rows]
    assert key == [("full", None, None), ("frozen", None, None), ("lora", 2, None), ("sparse", 2, "random")]
    assert not any("error" in r for r in rows)
    by = {r["method"]: r for r in rows}
    lora, sparse = by["lora"], by["sparse"]
    assert sparse["trainable"] == lora["trainable"] == lora_count(2)
    assert sparse["step_vs_lora"] == round(sparse["step_s"] / lora["step_s"], 3) and lora["step_vs_lora"] == 1.0
    assert sparse["memory_vs_lora"] == round(sparse["peak_memory_mb"] / lora["peak_memory_mb"], 3)
    assert sparse["step_vs_frozen"] == round(sparse["step_s"] / by["frozen"]["step_s"], 3)
    assert by["frozen"]["trainable"] == 0 and by["full"]["trainable"] > lora_count(2)
    assert "step_vs_lora" not in by["full"]  # no LoRA row shares its (absent) rank
    # the worker's structured fraction is the one its random mask's plans give
    model, _ = build(parse_args([*TINY, "--rank", "2"]), "sparse")
    assert sparse["structured_fraction"] == structure(model)["structured_fraction"]
    assert 0 < sparse["values_grad_s"] < sparse["step_s"]  # the values' gradient: part of the step, timed


def test_grad_mask_is_the_global_top_k_of_the_absolute_mean_gradient(data_dir):
    args = parse_args([*TINY, "--rank", "2,5", "--mask", "grad", "--data-dir", str(data_dir),
                       "--score-examples", "5"])
    masks = grad_masks(args)
    torch.manual_seed(0)
    model, batches = scoring_setup(args)
    assert sum(b["input_ids"].shape[0] for b in batches) == 5 and len(batches) == 3  # batches of --batch
    targets = find_targets(model, "llama", "all_linear", None)
    names = list(targets)
    grads = {n: torch.zeros_like(targets[n].weight) for n in names}
    model.eval()
    for b in batches:
        model.zero_grad()
        (model(**b).loss * b["input_ids"].shape[0] / 5).backward()
        for n in names:
            grads[n] += targets[n].weight.grad
    flat = torch.cat([grads[n].abs().reshape(-1) for n in names])
    offsets = torch.cumsum(torch.tensor([0] + [grads[n].numel() for n in names]), 0)
    for rank in (2, 5):
        k = lora_count(rank)
        top = set(torch.topk(flat, k).indices.tolist())
        got = {int(i) + int(offsets[j]) for j, n in enumerate(names) for i in masks[rank][n]}
        assert len(got) == k and len(got ^ top) <= 2  # equal up to ties at the k-th score
        assert any(masks[rank][n].numel() == 0 for n in names) or rank == 5  # global top-k allows empty modules


def test_grad_mask_rows_carry_the_plans_structure_in_bfloat16(data_dir, capsys):
    rows = main([*TINY, "--rank", "2", "--mask", "random,grad", "--methods", "sparse", "--dtype", "bfloat16",
                 "--data-dir", str(data_dir), "--score-examples", "4"])
    by = {r.get("mask"): r for r in rows if r["method"] == "sparse"}
    assert set(by) == {"random", "grad"} and not any("error" in r for r in rows)
    assert all(r["dtype"] == "bfloat16" and r["trainable"] == lora_count(2) for r in rows)
    args = parse_args([*TINY, "--rank", "2", "--mask", "grad", "--dtype", "bfloat16", "--data-dir", str(data_dir),
                       "--score-examples", "4"])
    plans = structure_of(args, grad_masks(args)[2])
    assert by["grad"]["structured_fraction"] == plans["structured_fraction"]
    assert by["grad"]["plans"] == plans["plans"]
    density = lora_count(2) / (2 * sum(o * i for o, i in TINY_SHAPES))
    for row in by.values():  # every plan computes at least its entries, and less than the dense products here
        assert density <= row["structured_fraction"] < 1.0


def structure_of(args, indices) -> dict:
    from speft.sparse.layer import inject

    model, _ = build(args, "frozen")
    assert next(model.parameters()).dtype == torch.bfloat16
    inject(model, indices)
    return structure(model)


def test_minilm_shape_is_the_default_runs_model_with_its_attention_targets():
    args = parse_args(["--shape", "minilm", "--device", "cpu"])
    assert (args.family, args.targets, args.batch, args.seq) == ("bert", "attention", 32, 64)
    args = parse_args(["--shape", "minilm", "--device", "cpu", "--rank", "1"])
    head = 384 * 2 + 2  # the new classifier, trained by both
    counts = {m: sum(p.numel() for p in build(args, m)[1]) for m in ("sparse", "lora", "frozen")}
    assert counts == {"sparse": 6 * 4 * (384 + 384) + head, "lora": 6 * 4 * (384 + 384) + head, "frozen": 0}


def test_nf4_rows_train_sparse_and_qlora_on_a_quantized_base_at_equal_counts(capsys):
    pytest.importorskip("bitsandbytes")
    rows = main([*TINY, "--rank", "2", "--quantization", "nf4", "--methods", "sparse,lora,frozen"])
    assert not any("error" in r for r in rows), rows
    by = {r["method"]: r for r in rows}
    assert set(by) == {"sparse", "lora", "frozen"} and all(r["quantization"] == "nf4" for r in rows)
    assert by["sparse"]["trainable"] == by["lora"]["trainable"] == lora_count(2)
    assert by["sparse"]["step_vs_frozen"] == round(by["sparse"]["step_s"] / by["frozen"]["step_s"], 3)


@pytest.mark.parametrize("bad", [["--mask", "magnitude"], ["--methods", "sparse,qlora"], ["--rank", "4,x"],
                                 ["--quantization", "nf4"], ["--quantization", "nf3", "--methods", "sparse"],
                                 ["--rank", "0"], ["--device", "cuda"] if not torch.cuda.is_available() else
                                 ["--repeats", "0"]])
def test_bad_arguments_fail_early(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_masks_file_caches_grad_masks_for_the_same_key_only(data_dir, tmp_path, monkeypatch):
    import speft.tools.bench as bench

    calls = []
    real = bench.grad_masks
    monkeypatch.setattr(bench, "grad_masks", lambda args: calls.append(args.rank) or real(args))
    base = [*TINY, "--mask", "grad", "--data-dir", str(data_dir), "--score-examples", "4",
            "--masks-file", str(tmp_path / "masks.pt")]
    first = bench.cached_grad_masks(parse_args([*base, "--rank", "2,3"]))
    again = bench.cached_grad_masks(parse_args([*base, "--rank", "3"]))  # a subset of the stored ranks
    assert calls == [[2, 3]] and all(torch.equal(again[3][n], first[3][n]) for n in first[3])
    bench.cached_grad_masks(parse_args([*base, "--rank", "3", "--seq", "6"]))  # other text: rescored
    bench.cached_grad_masks(parse_args([*base, "--rank", "4"]))  # a rank not stored: rescored
    assert calls == [[2, 3], [3], [4]]


def test_table_has_one_line_per_row_with_its_ratios_and_errors(default_bench):
    from speft.tools.bench import markdown_table

    rows = [{"method": "frozen", "step_s": 2.0, "peak_memory_mb": 100.0, "step_vs_frozen": 1.0, "shape": "tiny",
             "batch": 2, "seq": 8, "threads": 1, "repeats": 3},
            {"method": "sparse", "rank": 4, "mask": "grad", "step_s": 2.2, "peak_memory_mb": 90.0,
             "step_vs_lora": 0.9, "memory_vs_lora": 0.8, "step_vs_frozen": 1.1, "values_grad_s": 0.3,
             "structured_fraction": 0.15,
             "plans": {"dense": 1, "row_bands": 2}},
            {"method": "lora", "rank": 4, "error": ["boom"]}]
    text = markdown_table(rows)
    lines = text.strip().splitlines()
    assert lines[0] == "shape tiny, batch 2, seq 8, threads 1; median of 3 processes per row"
    assert lines[4:] == ["| frozen |  |  | 2.0 |  | 1.0 |  | 100.0 |  |  |  |",
                         "| sparse | 4 | grad | 2.2 | 0.9 | 1.1 | 0.3 | 90.0 | 0.8 | 0.15 | dense 1, row_bands 2 |",
                         "| lora | 4 |  | error: ['boom'] |  |  |  |  |  |  |  |"]  # a full-width row
    rows, _, written = default_bench  # --table writes the bench's own rows
    assert written == markdown_table(rows) and len(written.strip().splitlines()) == 4 + len(rows)


def test_peak_memory_is_the_workers_own_not_its_parents():
    """ru_maxrss carries the parent's size over fork and exec; the worker's peak must not."""
    import os
    import subprocess
    import sys

    from speft.tools.bench import peak_rss_mb

    big = torch.ones(256 * 2**20)  # 1 GiB held by this (parent) process while the child runs
    assert peak_rss_mb() > 1024
    code = "from speft.tools.bench import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
    assert 10 < child < 900, child  # torch imported, nothing of the parent's gigabyte
    del big


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_values_gradient_timer_sums_each_call_and_never_synchronises_a_cuda_step(device, monkeypatch):
    from speft.sparse import layer as sparse_layer
    from speft.tools.bench import ValuesGradTimer

    monkeypatch.setattr(sparse_layer.GradPlan, "values_grad", sparse_layer.GradPlan.values_grad)  # restored after

    class FakeEvent:  # CUDA events on CPU: each record advances a clock by 0.25 ms
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            FakeEvent.clock += 0.25
            self.t = FakeEvent.clock

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: pytest.fail("the timer synchronised the step"))
    timer = ValuesGradTimer(device)
    plan = sparse_layer.build_plan(torch.tensor([0, 5]), (4, 4))
    g, x = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(plan.values_grad(g, x), (g.t() @ x).view(-1)[[0, 5]])  # the wrapped result
    plan.values_grad(g, x)
    seconds = timer.take()
    assert (seconds == pytest.approx(2 * 0.25e-3)) if device == "cuda" else 0 < seconds < 1
    assert timer.take() == 0  # each take starts a new span


def test_target_layer_shapes_are_the_targets_of_the_shapes_model():
    from speft.tools.bench import target_layer_shapes

    shapes = target_layer_shapes("tiny")  # 2 layers of q,k,v,o,gate,up,down
    assert sorted(shapes.values()) == sorted(TINY_SHAPES * 2)
    assert "model.layers.1.mlp.down_proj" in shapes
