"""The CUDA paths' defects that a CPU test can catch: a fused AdamW step reaches the sparse layer's merged
weight, the loop's running loss is checkpointed as a Python number, TF32 follows trainer.tf32 and is
recorded, and half-precision training that would silently lose updates is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speft.config import TrainerConfig
from speft.pipeline import preflight, run
from speft.registry import ConfigError
from speft.sparse.layer import SparseDeltaLinear
from speft.train import checkpoint
from speft.train.checkpoint import Interrupted
from speft.train.loop import set_tf32, step_optimizer, use_fused

from .conftest import compose_cfg
from .signals import signal_after


def sparse_layer() -> SparseDeltaLinear:
    torch.manual_seed(0)
    return SparseDeltaLinear(nn.Linear(16, 8), torch.tensor([0, 5, 17, 40, 99]))


def test_a_fused_adamw_step_changes_the_sparse_layers_output():
    layer, x = sparse_layer(), torch.randn(4, 16)
    optimizer = torch.optim.AdamW([layer.values], lr=0.1, fused=True)
    before = layer(x).detach()
    layer(x).sum().backward()
    version = layer.values._version
    step_optimizer(optimizer, [layer.values])
    assert not torch.equal(layer.values.detach(), torch.zeros(5))  # the step happened...
    assert layer.values._version > version  # ...and the layer can see it
    after = layer(x).detach()
    assert not torch.allclose(before, after)
    assert torch.allclose(after, x @ (layer.base.weight.detach()).T + layer.base.bias.detach())  # merged W0 + Δ


def test_fused_is_the_cuda_default_and_a_key():
    cfg = TrainerConfig(name="t")
    assert use_fused(cfg, torch.device("cuda")) and not use_fused(cfg, torch.device("cpu"))
    assert use_fused(TrainerConfig(name="t", fused_adamw=True), torch.device("cpu"))


def test_a_run_with_fused_adamw_trains_and_checkpoints_a_python_running_loss(tmp_path, monkeypatch):
    overrides = ["debug=fast", "logger=none", "trainer.num_threads=1", "trainer.max_steps=3",
                 "trainer.fused_adamw=true", "trainer.checkpoint_every_steps=1", "trainer.keep_checkpoints=3",
                 "task.max_eval_examples=8", "method.save_adapter=false"]
    with monkeypatch.context() as m, pytest.raises(Interrupted):
        signal_after(m, "2:SIGTERM")  # stop after step 2: its checkpoint stays
        run(compose_cfg(*overrides), run_dir=tmp_path)
    _, record = checkpoint.checkpoints(tmp_path)[-1]
    loop = checkpoint.load(record.with_suffix(".pt"))["loop"]
    assert type(loop["running"]) is float and loop["running"] > 0
    result = run(compose_cfg(*overrides), run_dir=tmp_path)  # resumes with the float
    assert result.results["status"] == "completed" and result.results["train_steps"] == 3
    values = [m.values for m in result.model.modules() if isinstance(m, SparseDeltaLinear)]
    assert any(v.abs().sum() > 0 for v in values)  # the fused steps reached the trained entries


def test_tf32_follows_the_key_on_cuda_and_is_off_elsewhere():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert set_tf32(TrainerConfig(name="t"), torch.device("cuda")) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert set_tf32(TrainerConfig(name="t", tf32=False), torch.device("cuda")) is False
        assert not torch.backends.cuda.matmul.allow_tf32
        assert set_tf32(TrainerConfig(name="t", tf32=True), torch.device("cpu")) is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("overrides, message", [
    (["model.dtype=float16"], "model.dtype=float16 trains without a loss scaler"),
    (["method=full", "model.dtype=bfloat16"], "method=full with model.dtype=bfloat16"),
])
def test_half_precision_that_would_lose_updates_is_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        preflight(compose_cfg(*overrides), tmp_path)
    assert preflight(compose_cfg(*overrides, "trainer.max_steps=0"), tmp_path)  # evaluating as loaded is fine


def test_no_cpu_measured_plan_on_a_device_without_measured_costs():
    from speft.sparse.layer import candidate_plans

    idx = torch.arange(0, 64 * 64, 7)  # a strided mask: on the CPU a structured plan would be offered
    assert len(candidate_plans(idx, (64, 64))) > 1
    plans = candidate_plans(idx.to("meta"), (64, 64))  # any device type but the CPU's (CUDA here)
    assert [p.kind for p, _ in plans] == ["dense"]


def test_an_accelerator_gets_the_weights_through_device_map(monkeypatch):
    """Loading for CUDA passes device_map (weights straight to the device), never a host copy first."""
    from transformers import AutoModelForSequenceClassification

    from speft.models import loading

    seen = {}
    real = AutoModelForSequenceClassification.from_pretrained

    def spy(source, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map", None)  # no CUDA here: load on the CPU, as the spy's caller will not move it
        return real(source, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no CUDA to move to
    loading.load_model(compose_cfg().model, "seq_cls", 2, device=torch.device("cuda", 0))
    assert seen["device_map"] == {"": torch.device("cuda", 0)}
    seen.clear()
    loading.load_model(compose_cfg().model, "seq_cls", 2, device=torch.device("cpu"))
    assert "device_map" not in seen


def test_scoring_checkpoints_activations_when_asked_and_scores_the_same():
    """With gradient checkpointing the scoring pass recomputes each layer in backward (its activations are not
    kept), in eval mode otherwise: the same gradients as without it."""
    from speft.models.loading import find_targets, load_model
    from speft.salience.base import target_gradients

    def score(checkpointing: bool) -> tuple[dict, int]:
        torch.manual_seed(0)
        model = load_model(compose_cfg().model, "seq_cls", 2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = find_targets(model, "bert", "attention", None)
        calls = []
        for layer in model.bert.encoder.layer:  # a child: the layer's own hooks stay outside the checkpoint
            layer.intermediate.register_forward_hook(lambda *a: calls.append(1))
        grads = {}
        batch = {"input_ids": torch.randint(1000, 2000, (2, 12)), "labels": torch.tensor([0, 1]),
                 "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        with target_gradients(model, targets, lambda n, g: grads.__setitem__(n, g.clone())):
            model(**batch).loss.backward()
        assert not model.training
        return grads, len(calls)

    plain, plain_calls = score(False)
    checkpointed, checkpointed_calls = score(True)
    assert checkpointed_calls == 2 * plain_calls == 12  # each of the 6 layers run again in backward
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g)


def test_a_checkpoint_copies_trainable_weights_to_the_host():
    """(On the CPU a host copy is still a copy: it must not share storage with the live parameter.)"""
    model = nn.Sequential(nn.Linear(4, 4))
    state = checkpoint.trainable_state(model)
    weight = state["params"]["0.weight"]
    assert weight.device.type == "cpu" and weight.data_ptr() != model[0].weight.data_ptr()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(weight, model[0].weight)
