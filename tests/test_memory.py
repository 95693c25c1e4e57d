"""The pre-flight memory estimate (speft.memory): its components against a direct count on a tiny model, the
dry run (prints it, loads and writes nothing), and the estimate against a measured peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from speft.config import validate
from speft.memory import MB, TOLERANCE, Shape, activation_bytes, estimate
from speft.pipeline import preflight

from .conftest import ROOT, compose_cfg

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "glue").exists(), reason="../shared/data not present")


@pytest.mark.parametrize("method", ["sparse", "lora", "full", "head_only"])
def test_the_components_are_the_direct_counts(method, tmp_path):
    plan = preflight(compose_cfg(f"method={method}", "logger=none", f"paths.cache_dir={tmp_path}"), tmp_path / "r")
    spec, est = plan.spec, plan.memory
    from speft.models.loading import build_meta_model, head_parameters

    meta = build_meta_model(spec.model, plan.task.head, plan.task.num_labels)
    params = sum(p.numel() for p in meta.parameters())
    assert est.weights == est.loading == 4 * params  # fp32 MiniLM
    head = sum(p.numel() for p in head_parameters(meta, "bert").values())
    k = plan.entries or 0  # None: density does not apply (full, head_only)
    expected = {"sparse": k * (4 + 4 + 8 + 4) + head * 12, "lora": k * 16 + head * 12,  # values, grad, AdamW, index
                "full": params * 12, "head_only": head * 12}[method]
    assert est.trainable == expected
    targets = sum(o * i for o, i in plan.shapes.values())
    assert est.scores == (4 * targets if method == "sparse" else 0)
    assert est.peak == est.runtime + est.weights + max(est.loading, est.scores + est.score_activations,
                                                      est.trainable + est.activations)
    assert plan.memory.record()["peak"] == round(est.peak / MB, 1)


def test_activations_grow_with_the_batch_and_the_square_of_the_length_and_checkpointing_cuts_them():
    shape = Shape(layers=4, hidden=64, intermediate=256, heads=4, vocab=1000, gated=False)
    one = activation_bytes(shape, 1, 32, 4, False, False)
    assert activation_bytes(shape, 2, 32, 4, False, False) == 2 * one
    per_token = 10 * 64 + 2 * 256
    per_layer = 4 * (32 * per_token + 2 * 4 * 32 * 32)
    assert one == 5 * per_layer  # 4 layers stored + 1 layer of gradients during backward
    assert activation_bytes(shape, 1, 32, 4, True, False) == 4 * 4 * 32 * 64 + 2 * per_layer
    assert activation_bytes(shape, 1, 32, 4, False, True) == one + 2 * 4 * 32 * 1000  # fp32 logits and grad


def test_data_parallel_divides_the_batch_and_bf16_halves_the_weights(tmp_path):
    spec = validate(compose_cfg("logger=none", "model.dtype=bfloat16"))
    from speft.models.loading import build_meta_model

    meta = build_meta_model(spec.model, "seq_cls", 2)
    one = estimate(meta, spec, {}, 0, device="cpu")
    two = estimate(meta, spec, {}, 0, device="cpu", world_size=2)
    assert one.weights == 2 * sum(p.numel() for p in meta.parameters())
    assert two.activations < one.activations and two.weights == one.weights


def test_dry_run_prints_the_estimate_and_loads_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "dry_run=true", "task=gsm8k", "model=smollm2_135m",
                           f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "921,600 trainable entries" in proc.stdout and "memory estimate per process (cpu): peak" in proc.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "models").exists()


def measured(overrides: list[str], tmp_path) -> tuple[float, float]:
    sys.path.insert(0, str(ROOT / "experiments" / "memory"))
    import measure

    r = measure.measure("test", overrides)
    return r["measured_rss_mb"], r["estimate_mb"]


@needs_data
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_the_estimate_is_within_tolerance_of_a_measured_peak(quantization, tmp_path):
    rss, est = measured(["task=glue/mrpc", "task.max_length=48", f"model.quantization={quantization}"], tmp_path)
    assert abs(rss / est - 1) <= TOLERANCE, (rss, est)


def test_nf4_counts_its_linear_layers_at_half_a_byte_and_qlora_casts_the_rest_to_fp32(compose_config):
    from speft.memory import weight_bytes
    from speft.models.loading import build_meta_model
    from speft.models.quantization import bytes_per_weight

    spec = validate(compose_config("model=smollm2_135m", "model.quantization=nf4", "model.dtype=bfloat16"))
    meta = build_meta_model(spec.model, "causal_lm", None)
    linear = sum(m.weight.numel() for n, m in meta.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")  # lm_head is the tied embedding
    rest = sum(p.numel() for p in meta.parameters()) - linear
    assert weight_bytes(meta, spec.model, 2) == round(linear * bytes_per_weight("nf4", 2, 576) + 2 * rest)
    assert weight_bytes(meta, spec.model, 2, peft=True) == round(linear * bytes_per_weight("nf4", 2, 576) + 4 * rest)


def test_the_committed_measurements_are_within_tolerance():
    rows = json.loads((ROOT / "experiments" / "memory" / "measured.json").read_text())
    assert {"minilm/mrpc/sparse/nf4", "smollm2/gsm8k/lora/nf4"} <= {r["case"] for r in rows}
    for r in rows:
        assert abs(r["measured_rss_mb"] / r["estimate_mb"] - 1) <= TOLERANCE, r["case"]


@needs_data
@pytest.mark.slow
def test_the_estimate_is_within_tolerance_on_smollm2(tmp_path):
    rss, est = measured(["model=smollm2_135m", "task=gsm8k", "task.max_length=128", "trainer.batch_size=4",
                         "trainer.grad_accum_steps=1", "task.max_eval_examples=1", "task.evaluation=nll",
                         "task.generate_examples=0", "metric.num_score_examples=8"], tmp_path)
    assert abs(rss / est - 1) <= TOLERANCE, (rss, est)


def test_results_record_the_estimate(tmp_path):
    from speft.pipeline import run

    run(compose_cfg("logger=none", "debug=fast", "trainer.max_steps=1", "method.save_adapter=false"), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed" and data["memory_estimate_mb"]["peak"] > 0
    assert torch.isfinite(torch.tensor(data["memory_estimate_mb"]["activations"]))


def test_a_config_the_estimate_cannot_read_leaves_the_run_without_one(monkeypatch, tmp_path, caplog):
    import speft.pipeline as pipeline

    def unreadable(*args, **kwargs):
        raise ValueError("the model config has none of num_hidden_layers")

    monkeypatch.setattr(pipeline, "estimate_memory", unreadable)
    plan = preflight(compose_cfg("logger=none", f"paths.cache_dir={tmp_path}"), tmp_path / "run")
    assert plan.memory is None and "no memory estimate" in caplog.text
    result = pipeline.run(compose_cfg("logger=none", "dry_run=true"), run_dir=tmp_path / "run")
    assert result.results == {"dry_run": True, "memory_estimate_mb": None} and not (tmp_path / "run").exists()


def test_a_run_launched_from_a_large_process_records_its_own_peak():
    """ru_maxrss keeps the forking parent's peak across exec; results.json's peak must be the run's own."""
    big = bytearray(400 * 2**20)
    big[:: 4096] = b"\x01" * len(big[:: 4096])  # touch every page: the parent's RSS is now > 400 MB
    probe = "import resource; from speft.results import peak_memory_mb; " \
            "print(peak_memory_mb()['rss'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    own, inherited = map(float, out.stdout.split())
    assert inherited > 400 and own < 300, (own, inherited)
    del big
