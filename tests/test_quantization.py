"""A quantized base (``model.quantization``): bitsandbytes NF4/int8 layers, on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from speft import registry
from speft.models.loading import find_targets, load_model
from speft.models.quantization import dense_weight, is_quantized, quantized_layers
from speft.pipeline import preflight, run
from speft.registry import ConfigError
from speft.salience.base import ScoreContext
from speft.sparse import layer as sparse_layer
from speft.sparse.io import load_adapter, merge_and_unload, save_adapter
from speft.sparse.layer import SparseDeltaLinear, sparse_layers

from .conftest import compose_cfg

bnb = pytest.importorskip("bitsandbytes")


def quantized_linear(kind: str, out_f: int = 96, in_f: int = 128, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    if kind == "nf4":
        q = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes the weight


def sparse_on(base: torch.nn.Module, n: int = 300, seed: int = 1) -> SparseDeltaLinear:
    g = torch.Generator().manual_seed(seed)
    numel = base.out_features * base.in_features
    layer = SparseDeltaLinear(base, torch.randperm(numel, generator=g)[:n])
    with torch.no_grad():
        layer.values.copy_(torch.randn(n, generator=g) * 0.1)
    return layer


def reference(layer: SparseDeltaLinear, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients (input, values) of the dense computation F.linear(x, dequantize(W0) + Δ)."""
    x = x.detach().clone().requires_grad_(True)
    values = layer.values.detach().clone().requires_grad_(True)
    idx = layer.indices.long()
    w = dense_weight(layer.base).float().reshape(-1)
    w = w.index_put((idx,), w[idx] + values).view(layer.shape)
    y = torch.nn.functional.linear(x, w, layer.base.bias)
    return (y, *torch.autograd.grad(y, (x, values), grad))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_the_sparse_delta_beside_a_quantized_weight_is_the_dense_computation(kind, tokens, monkeypatch):
    layer = sparse_on(quantized_linear(kind))
    assert layer.quantized and is_quantized(layer)
    packed = layer.base.weight.data.clone()
    x = torch.randn(2, tokens, 128, requires_grad=True)
    for path in ({}, {"cpu": 2 * tokens}):  # de-quantize and scatter; the sparse product from the entries alone
        monkeypatch.setattr(sparse_layer, "SPARSE_PRODUCT_TOKENS", path)
        y = layer(x)
        g = torch.randn_like(y)
        gx, gv = torch.autograd.grad(y, (x, layer.values), g)
        ry, rx, rv = reference(layer, x, g)
        torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gv, rv, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.base.weight.data, packed)  # the quantized weight never changes


def test_the_dense_weight_survives_bitsandbytes_repacking_it_for_an_eval_forward():
    q = quantized_linear("nf4")
    before = dense_weight(q).clone()
    q.eval()
    with torch.no_grad():  # on CPUs with AVX512-BF16 bitsandbytes repacks the weight for its bf16 kernel here
        q(torch.randn(3, 128))
    # the same weights, up to the block scales that the repacking keeps in bf16 (without undoing it: noise of ~1)
    torch.testing.assert_close(dense_weight(q), before, rtol=1e-2, atol=1e-3)


def test_a_step_trains_the_values_and_regrow_and_resume_keep_the_quantized_weight():
    layer = sparse_on(quantized_linear("nf4"), n=200)
    packed = layer.base.weight.data.clone()
    x = torch.randn(4, 5, 128)
    before = layer(x).detach()
    opt = torch.optim.AdamW([layer.values], lr=1e-2, fused=True)
    layer(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(layer(x), before)  # also after a fused AdamW step (no merged weight to refresh)
    state = layer.checkpoint_state()
    assert state["weight_touched"] is None  # nothing of the quantized weight is stored
    layer.regrow(torch.arange(10), torch.arange(10))  # entries 0..9 of the weight, trained from zero
    assert torch.equal(layer.values.detach()[:10], torch.zeros(10))
    torch.testing.assert_close(layer.base_values[:10], dense_weight(layer.base).reshape(-1)[:10])
    fresh = sparse_on(quantized_linear("nf4"), n=200, seed=5)
    fresh.load_checkpoint_state(state)
    torch.testing.assert_close(fresh(x), layer.__class__.forward(fresh, x))
    assert torch.equal(layer.base.weight.data, packed)
    with pytest.raises(ValueError, match="reselect"):
        layer.reselect(torch.arange(20))


def minilm(quantization: str):
    cfg = compose_cfg("debug=fast", f"model.quantization={quantization}").model
    return load_model(cfg, "seq_cls", 2)


def batches(n: int = 8, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, length // 2:] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    return lambda: iter([{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4], "labels": labels[i:i + 4]}
                         for i in range(0, n, 4)])


def scores(name: str, model) -> dict[str, torch.Tensor]:
    entry = registry.get("metric", name)
    metric = entry.obj(entry.schema())
    targets = find_targets(model, "bert", "attention", None)
    return metric.compute(ScoreContext(model, targets, batches(), 8, 0))


@pytest.fixture(scope="module")
def bases():
    """An NF4 MiniLM, its twin with the same de-quantized weights in plain float layers, and the fp32 MiniLM,
    all with the same head."""
    quantized = minilm("nf4")
    twin = merge_and_unload(minilm("nf4"))
    plain = minilm("none")
    for m in (twin, plain):
        m.classifier.load_state_dict(quantized.classifier.state_dict())
    return quantized, twin, plain


def test_a_quantized_base_keeps_its_head_and_embeddings_in_float(bases):
    quantized, twin, _ = bases
    assert len(quantized_layers(quantized)) == 6 * 6 + 1  # q, k, v, o, intermediate, output per layer; the pooler
    assert not is_quantized(quantized.classifier) and not quantized_layers(twin)


@pytest.mark.parametrize("name", registry.names("metric"))
def test_every_metric_scores_a_quantized_base_as_its_dequantized_weights(name, bases):
    quantized, twin, plain = bases
    layer = quantized.bert.encoder.layer[0].attention.self.query
    got, want = scores(name, quantized), scores(name, twin)
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=1e-3, atol=1e-7)
    # the model is as it was: quantized layers back in place, no gradient left
    assert quantized.bert.encoder.layer[0].attention.self.query is layer and is_quantized(layer)
    assert all(p.grad is None for p in quantized.parameters())
    if name == "grad":  # against the fp32 model: the top 1 % of |g| overlap (reported; NF4 moves the weights)
        ref = scores(name, plain)
        a, b = (torch.cat([s[n].abs().reshape(-1) for n in sorted(s)]) for s in (got, ref))
        k = a.numel() // 100
        overlap = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
        print(f"top-1% overlap of grad scores, nf4 vs fp32 MiniLM: {overlap:.3f}")
        assert overlap > 0.5  # far above the 0.01 of unrelated scores


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4")
    # with a regrow mask: its re-scoring takes salience through the sparse layers on the quantized base
    return out, run(compose_cfg("debug=fast", "logger=none", "model.quantization=nf4", "mask=regrow",
                                "mask.update_every_steps=2", "mask.num_score_examples=8"), run_dir=out)


def test_a_sparse_run_on_nf4_records_it_and_saves_an_adapter_that_reloads_and_merges(nf4_run, tmp_path):
    out, result = nf4_run
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "completed" and data["config"]["model"]["quantization"] == "nf4"
    assert data["memory_estimate_mb"]["weights"] < 60  # NF4 linear layers: fp32 MiniLM holds 87 MB
    assert data["mask_updates"][0]["kind"] == "regrow" and data["mask_updates"][0]["grown"] > 0
    trained = result.model
    layers = sparse_layers(trained)
    assert layers and all(m.quantized for m in layers.values())
    ids = batches()()
    batch = next(ids)
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # the adapter onto a freshly loaded NF4 base, with the trained head: the same outputs
    save_adapter(trained, tmp_path / "adapter")
    fresh = minilm("nf4")
    fresh.classifier.load_state_dict(trained.classifier.state_dict())
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        again = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, want)
    # merged into a plain float checkpoint: de-quantized W0 + Δ reproduces the trained model
    merge_and_unload(fresh)
    assert not quantized_layers(fresh) and not sparse_layers(fresh)
    fresh.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not quantized_layers(plain)
    with torch.no_grad():
        merged = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # bitsandbytes evaluates the other 4-bit layers with a bf16 CPU kernel (AVX512-BF16), the plain model in fp32
    torch.testing.assert_close(merged, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_lora_family_on_nf4_trains_as_qlora(method, tmp_path):
    result = run(compose_cfg("debug=fast", "logger=none", "model.quantization=nf4", f"method={method}"),
                 run_dir=tmp_path)
    assert result.results["status"] == "completed"
    lora = [m for n, m in result.model.named_modules() if n.endswith("attention.self.query")][0]
    assert is_quantized(lora.base_layer) and result.results["trainable"]["adapter"] > 0


def test_pissa_on_nf4_is_qpissa_the_checkpoints_svd_and_a_requantized_residual(bases, tmp_path):
    """The targets load in float, PiSSA takes their principal components, the residual is quantized again: the
    frozen NF4 residual plus the adapter is closer to the fp32 checkpoint than the NF4 weight QLoRA trains on."""
    _, _, plain = bases
    result = run(compose_cfg("debug=fast", "logger=none", "model.quantization=nf4", "method=pissa",
                             "trainer.max_steps=0"), run_dir=tmp_path)
    nf4 = minilm("nf4")
    errors = []
    for name in find_targets(plain, "bert", "attention", None):
        layer = result.model.get_submodule(name)
        assert is_quantized(layer.base_layer)  # the residual is NF4 again
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        qpissa = dense_weight(layer.base_layer).float() + layer.scaling["default"] * (b @ a)
        w0 = plain.get_submodule(name).weight
        errors.append(((qpissa - w0).norm().item(), (dense_weight(nf4.get_submodule(name)).float() - w0).norm().item()))
    assert all(q < qlora for q, qlora in errors), errors  # recorded: layer 0's query 3.11 vs 3.41 (norm 36.7)
    assert errors[0] == pytest.approx((3.11, 3.41), abs=0.02)


def refusals() -> list[tuple[str, str]]:
    return [(group, name) for group in ("method", "mask") for name in registry.names(group)
            if registry.get(group, name).obj.quantized_refusal is not None]


@pytest.mark.parametrize("group,name", refusals())
def test_components_that_cannot_run_on_a_quantized_base_are_refused_before_loading(group, name, tmp_path):
    overrides = ["debug=fast", "logger=none", "model.quantization=nf4", f"{group}={name}"]
    if group == "method" and name == "full":
        overrides.append("model.dtype=float32")
    with pytest.raises(ConfigError, match=rf"{group}={name} cannot run on model.quantization=nf4: .+ Valid choices"):
        preflight(compose_cfg(*overrides), tmp_path)


def test_the_refusals_are_full_fine_tuning_and_the_merging_masks():
    assert set(refusals()) == {("method", "full"), ("mask", "reselect"), ("mask", "dynamic")}


def test_a_missing_bitsandbytes_or_an_unknown_quantization_is_a_config_error(monkeypatch, tmp_path):
    import importlib.util

    from speft.config import validate

    with pytest.raises(ConfigError, match="model.quantization='nf3' is not valid. Valid choices: none, nf4, int8"):
        validate(compose_cfg("model.quantization=nf3"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        validate(compose_cfg("model.quantization=nf4"))


def mapped_ranges(suffix: str) -> list[tuple[int, int]]:
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(suffix):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_a_quantized_model_on_the_host_keeps_no_view_of_the_checkpoint_file():
    """transformers quantizes from the memory-mapped fp32 file; a float parameter left viewing it would keep every
    page of the file resident (520 MB on SmolLM2-135M). Loading copies them out (release_checkpoint)."""
    model = minilm("nf4")
    inside = lambda p: any(lo <= p.data_ptr() < hi for lo, hi in mapped_ranges(".safetensors"))  # noqa: E731
    assert not [n for n, p in model.named_parameters() if inside(p)]
