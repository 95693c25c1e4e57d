"""Save -> load -> merge round trips on the real MiniLM: same outputs, plain HF checkpoint, exact unmerge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import speft.config
from speft.models.loading import load_model
from speft.sparse.io import CONFIG, WEIGHTS, load_adapter, merge_and_unload, save_adapter, unload
from speft.sparse.layer import inject, sparse_layers

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def model_cfg():
    return compose_cfg().model


def fresh(model_cfg):
    torch.manual_seed(0)  # the same classifier head for every copy
    return load_model(model_cfg, "seq_cls", 2).eval()


def adapted(model_cfg):
    model = fresh(model_cfg)
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_modules() if n.endswith(("query", "value"))]
    indices = {n: torch.randperm(384 * 384, generator=g)[:500] for n in names}
    for layer in inject(model, indices).values():
        with torch.no_grad():
            layer.values.normal_(0, 0.05, generator=g)
    return model


BATCH = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0]])}


def test_save_load_reproduces_outputs_at_8_bytes_per_entry(model_cfg, tmp_path):
    model = adapted(model_cfg)
    expected = model(**BATCH).logits
    save_adapter(model, tmp_path, base_model="minilm", metric="grad")
    entries = sum(m.values.numel() for m in sparse_layers(model).values())
    tensor_bytes = sum(m.values.numel() * 4 + m.indices.numel() * 4 for m in sparse_layers(model).values())
    assert tensor_bytes == 8 * entries
    assert (tmp_path / WEIGHTS).stat().st_size < 8 * entries + 16_384  # + safetensors header
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["entries"] == entries and config["metric"] == "grad"

    other = fresh(model_cfg)
    load_adapter(other, tmp_path)
    torch.testing.assert_close(other(**BATCH).logits, expected, atol=1e-6, rtol=1e-6)


def test_merge_gives_a_plain_hf_model_with_the_same_outputs(model_cfg, tmp_path):
    model = adapted(model_cfg)
    expected = model(**BATCH).logits
    merged = merge_and_unload(model)
    assert not sparse_layers(merged)
    merged.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(**BATCH).logits, expected, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_the_base_bit_exactly(model_cfg):
    base = fresh(model_cfg).state_dict()
    model = unload(adapted(model_cfg), merge=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base[name]), name


def test_loading_onto_the_wrong_model_fails_clearly(model_cfg, tmp_path):
    save_adapter(adapted(model_cfg), tmp_path)
    wrong = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(wrong, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a speft adapter folder"):
        load_adapter(wrong, tmp_path / "nowhere")


def test_round_trip_on_smollm2_135m(tmp_path):
    """The packaged SmolLM2-135M (GGUF, de-quantised): save -> load -> merge -> plain HF checkpoint."""
    import copy

    cfg = compose_cfg("model=smollm2_135m")
    base = load_model(cfg.model, "causal_lm", None, speft.config.PathsConfig(**cfg.paths).resolve("cache_dir"))
    base.eval()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    shapes = {n: model.get_submodule(n).weight.numel() for n in names}
    for layer in inject(model, {n: torch.randperm(shapes[n], generator=g)[:2000] for n in names}).values():
        with torch.no_grad():
            layer.values.normal_(0, 0.02, generator=g)
    ids = {"input_ids": torch.tensor([[1, 504, 3458, 314, 253, 1345]])}
    expected = model(**ids).logits
    save_adapter(model, tmp_path / "adapter", base_model="smollm2_135m")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "adapter")
    torch.testing.assert_close(loaded(**ids).logits, expected, atol=1e-5, rtol=1e-5)
    merge_and_unload(loaded).save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain(**ids).logits, expected, atol=1e-4, rtol=1e-4)
