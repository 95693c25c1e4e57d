"""The default pipeline end to end under debug=fast: a complete results.json, an exact mask, frozen
weights untouched, failures recorded, W&B offline logging."""

from __future__ import annotations

import json

import pytest
import torch

from speft import registry
from speft.config import validate
from speft.models.loading import load_model
from speft.pipeline import run
from speft.results import RESULTS_FILE
from speft.sparse.layer import sparse_layers

from .conftest import compose_cfg

KEYS = {"config", "metrics", "trainable_params", "total_params", "density", "mask", "timings", "peak_memory_mb",
        "versions", "git_sha", "seed", "status"}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    result = run(compose_cfg("debug=fast", "logger=none"), run_dir=out)
    return out, result


def test_fast_run_writes_a_complete_results_file(fast_run):
    out, result = fast_run
    data = json.loads((out / RESULTS_FILE).read_text())
    assert KEYS <= set(data) and data["status"] == "completed" and data["error"] is None
    assert 0.0 <= data["metrics"]["test/accuracy"] <= 1.0 and "validation/accuracy" in data["metrics"]
    assert data["config"]["metric"]["name"] == "grad" and data["config"]["density"] == "lora:8"
    assert {"scoring_s", "selection_s", "training_s", "evaluation_s", "total_s"} <= set(data["timings"])
    assert data["versions"]["torch"] == torch.__version__ and data["peak_memory_mb"]["rss"] > 0
    assert data["train_steps"] == 5 and data["num_score_examples"] == 32


def test_mask_has_exactly_the_lora_r8_budget(fast_run):
    _, result = fast_run
    data = result.results
    lora_r8 = 8 * (384 + 384) * 4 * 6  # r·(in+out) for q, k, v, o in 6 layers
    assert data["budget"]["entries"] == lora_r8
    assert sum(m["selected"] for m in data["mask"].values()) == lora_r8 == data["trainable"]["sparse"]
    assert data["trainable_params"] == lora_r8 + 384 * 2 + 2  # plus the classifier head
    assert len(data["mask"]) == 24
    assert data["density"] == pytest.approx(lora_r8 / (384 * 384 * 24))


def test_frozen_weights_outside_the_mask_are_bit_identical(fast_run):
    _, result = fast_run
    cfg = compose_cfg("debug=fast", "logger=none")
    fresh = load_model(cfg.model, "seq_cls", 2).state_dict()
    trained = result.model
    layers = sparse_layers(trained)
    changed_inside = 0
    for name, tensor in trained.state_dict().items():
        if name.startswith("classifier") or name.endswith((".values", ".indices", ".base_values")):
            continue
        plain = name.replace(".base.", ".")
        module = plain.rsplit(".", 1)[0]
        if module in layers and plain.endswith(".weight"):
            idx = layers[module].indices.long()
            outside = torch.ones(tensor.numel(), dtype=torch.bool)
            outside[idx] = False
            assert torch.equal(tensor.view(-1)[outside], fresh[plain].view(-1)[outside]), name
            expected = fresh[plain].view(-1)[idx] + layers[module].values.detach()
            torch.testing.assert_close(tensor.view(-1)[idx], expected)
            changed_inside += int((tensor.view(-1)[idx] != fresh[plain].view(-1)[idx]).sum())
        else:
            assert torch.equal(tensor, fresh[plain]), name
    assert changed_inside > 0  # training moved the selected entries


def test_predictions_files_pair_examples_in_file_order(fast_run):
    """Evaluation runs sorted by length; the predictions files map back to each split's file order."""
    out, result = fast_run
    spec = validate(compose_cfg("debug=fast", "logger=none"))
    splits = registry.get("task", spec.task.name).obj(spec.task, spec.paths.resolve("data_dir")).splits()
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(len(splits[split])))
        assert [r["label"] for r in rows] == [r["label"] for r in splits[split]]
        accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
        assert accuracy == pytest.approx(result.results["metrics"][f"{split}/accuracy"])


def test_a_failing_run_is_recorded_as_failed(tmp_path, monkeypatch):
    from speft.salience import grad

    def boom(self, ctx):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(grad.Grad, "score", boom)
    with pytest.raises(RuntimeError, match="scoring exploded"):
        run(compose_cfg("debug=fast", "logger=none"), run_dir=tmp_path)
    data = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert data["status"] == "failed" and data["error"]["message"] == "scoring exploded"
    assert data["config"]["metric"]["name"] == "grad"


def test_wandb_offline_logs_config_curves_mask_and_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    cfg = compose_cfg("debug=fast", "logger=wandb", "logger.mode=offline", "trainer.log_every_steps=1")
    run(cfg, run_dir=tmp_path, run_name="t", sweep_dir="multirun/x")
    import wandb

    wandb.teardown()  # W&B's service writes asynchronously: stopping it flushes every file
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # An offline run is one protobuf log; its keys and strings are stored as plain UTF-8.
    needles = [b"train/loss", b"train/lr", b"validation/accuracy", b"test/accuracy", b"rotten_tomatoes",
               b"multirun/x", b"trainable_params", b"completed", b"main_metric"]
    blob = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
    tables = list((runs[0] / "files" / "media" / "table").glob("mask_*.table.json"))
    missing = [n for n in needles if n not in blob]
    assert not missing and tables, (missing, tables)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["module", "selected", "total", "density"] and len(table["data"]) == 24


def test_wandb_auto_mode_is_online_only_with_credentials(monkeypatch, tmp_path):
    from speft.loggers.wandb import resolve_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled" and resolve_mode("online") == "online"


def test_a_diverging_run_stops_failed_with_the_step_and_a_hint(tmp_path):
    """A learning rate that overflows the weights: the run ends `failed` at the first non-finite gradient,
    naming the step and the learning rate, instead of training on NaN and reporting the majority class."""
    from speft.train.loop import Diverged

    with pytest.raises(Diverged, match=r"at optimizer step 2 \(learning rate 8e\+29\).*Lower trainer.lr"):
        run(compose_cfg("debug=fast", "logger=none", "trainer.lr=1e30", "task.max_eval_examples=8",
                        "method.save_adapter=false"), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed" and data["error"]["type"] == "Diverged"
