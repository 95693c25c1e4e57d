"""Every method runs end to end; LoRA-family counts match the sparse budget; only the method's
parameters change."""

from __future__ import annotations

import json

import pytest
import torch

from speft import registry
from speft.models.loading import load_model
from speft.pipeline import run
from speft.registry import ConfigError

from .conftest import compose_cfg

METHODS = registry.names("method")
LORA_R8 = 8 * 768 * 24  # r·(in+out) for q, k, v, o of MiniLM's 6 layers
HEAD = 384 * 2 + 2


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_and_trains_only_its_parameters(name, tmp_path):
    result = run(compose_cfg("debug=fast", "logger=none", f"method={name}"), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed" and "test/accuracy" in data["metrics"]
    assert data["trainable"]["head"] == HEAD
    torch.manual_seed(0)
    fresh = load_model(compose_cfg().model, "seq_cls", 2).state_dict()
    # wrapped layers keep the base weight as `.base_layer.` (PEFT) or `.base.` (sparse)
    trained = {k.replace(".base_layer.", ".").replace(".base.", "."): v for k, v in result.model.state_dict().items()}
    unchanged = [k for k in fresh if k in trained and torch.equal(fresh[k], trained[k])]
    changed = [k for k in fresh if k in trained and not torch.equal(fresh[k], trained[k])]
    if name == "head_only":
        assert set(changed) <= {"classifier.weight", "classifier.bias"} and data["trainable_params"] == HEAD
    if name == "full":
        assert any("intermediate" in k for k in changed)  # the body trains too
    if name in ("lora", "dora"):
        assert not [k for k in changed if not k.startswith("classifier")]  # base weights untouched
    if name == "pissa":  # PiSSA moves the principal components out of the frozen weights, nothing else
        assert all("attention" in k or k.startswith("classifier") for k in changed)
    if name != "full":
        assert any("embeddings" in k for k in unchanged)  # embeddings, layer norms, ... stay as pretrained


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_lora_rank_matches_the_sparse_budget(name, tmp_path):
    run(compose_cfg("debug=fast", "logger=none", f"method={name}", "method.rank=8"), run_dir=tmp_path / "a")
    run(compose_cfg("debug=fast", "logger=none", "method=sparse", "density=lora:8"), run_dir=tmp_path / "b")
    lora = json.loads((tmp_path / "a" / "results.json").read_text())
    sparse = json.loads((tmp_path / "b" / "results.json").read_text())
    assert lora["trainable"]["adapter"] == sparse["trainable"]["sparse"] == LORA_R8
    assert lora["trainable_params"] == sparse["trainable_params"] == LORA_R8 + HEAD
    assert lora["density"] == pytest.approx(sparse["density"])


def test_frozen_head_is_counted_out_and_left_at_its_initialisation(tmp_path):
    result = run(compose_cfg("debug=fast", "logger=none", "method=lora", "method.train_head=false"),
                 run_dir=tmp_path)
    assert result.results["trainable_params"] == LORA_R8 and result.results["trainable"]["head"] == 0


def test_dynamic_masks_need_the_sparse_method(tmp_path):
    from speft.pipeline import preflight

    with pytest.raises(ConfigError, match="mask=reselect"):
        preflight(compose_cfg("method=lora", "mask=reselect"), tmp_path)
