"""Causal-LM tasks: prompt/response encoding (loss on the response only, truncation, packing, chat
template), the data readers on the real files in ../shared/data and on crafted bad ones, the LLM presets'
budgets, and end-to-end runs on a tiny random Llama and on the packaged SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from speft.config import Budget, validate
from speft.models.architectures import meta_causal_lm
from speft.models.loading import find_targets, plain_copy, target_shapes
from speft.pipeline import preflight, run
from speft.registry import ConfigError
from speft.sparse.layer import sparse_layers
from speft.tasks.base import DataError
from speft.tasks.gsm8k import Gsm8k, Gsm8kConfig
from speft.tasks.lm import IGNORE, pack
from speft.tasks.mmlu import Mmlu, MmluConfig, oasst2_pairs

from .conftest import ROOT, compose_cfg
from .test_eval_gsm8k import tiny_llama, tiny_tokenizer

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").exists(), reason="../shared/data not present")
ROWS = [{"prompt": "What is 2+2?", "response": "2+2 = 4\n#### 4"},
        {"prompt": "Name a colour.", "input": "It is the colour of the sky.", "response": "Blue."}]


def gsm(**kw) -> Gsm8k:
    return Gsm8k(Gsm8kConfig(**kw), DATA)


# --------------------------------------------------------------------------- encoding


def test_loss_covers_the_response_and_its_eos_only():
    tok = tiny_tokenizer()
    enc = gsm().encode(tok, ROWS[:1], max_length=512)[0]
    prompt_len = len(tok("Question: What is 2+2?\nAnswer:")["input_ids"])
    assert enc["labels"][:prompt_len] == [IGNORE] * prompt_len
    response = enc["labels"][prompt_len:]
    assert response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == " 2+2 = 4\n#### 4"
    assert enc["input_ids"][prompt_len:] == response and len(enc["attention_mask"]) == len(enc["input_ids"])

    with_prompt = gsm(train_on_prompt=True).encode(tok, ROWS[:1], max_length=512)[0]
    assert IGNORE not in with_prompt["labels"] and with_prompt["labels"] == with_prompt["input_ids"]


def test_alpaca_template_with_and_without_input():
    task = gsm(template="alpaca")
    prompt, response = task.texts(ROWS[0])
    assert prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response:\n") and "### Input" not in prompt
    prompt, _ = task.texts(ROWS[1])
    assert "### Input:\nIt is the colour of the sky.\n\n### Response:\n" in prompt
    assert response == ROWS[0]["response"]
    assert gsm(qa_prompt="Q: {prompt} Think.\nA:").texts(ROWS[0])[0] == "Q: What is 2+2? Think.\nA:"


def test_truncation_drops_examples_without_response_tokens():
    tok = tiny_tokenizer()
    long = {"prompt": "word " * 200, "response": "4"}
    out = gsm().encode(tok, [ROWS[0], long], max_length=24)
    assert len(out) == 1 and len(out[0]["input_ids"]) <= 24
    assert any(label != IGNORE for label in out[0]["labels"])
    with pytest.raises(DataError, match="max_length=24"):
        gsm().encode(tok, [long], max_length=24)


def test_packing_keeps_every_token_in_blocks():
    tok = tiny_tokenizer()
    plain = gsm().encode(tok, ROWS * 3, max_length=512)
    packed = gsm(packing=True).encode(tok, ROWS * 3, max_length=16)
    assert all(len(b["input_ids"]) == 16 for b in packed[:-1]) and len(packed[-1]["input_ids"]) <= 16
    assert [t for b in packed for t in b["labels"]] == [t for e in plain for t in e["labels"]]
    assert pack([], 8) == []


def test_chat_template_splits_user_and_assistant_turns():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
    enc = gsm(template="chat").encode(tok, ROWS[:1], max_length=512)[0]
    response = [t for t in enc["labels"] if t != IGNORE]
    assert tok.decode(response) == "2+2 = 4\n#### 4"
    assert tok.decode(enc["input_ids"][: len(enc["input_ids"]) - len(response)]).endswith("assistant\n")
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        gsm(template="chat").encode(tok, ROWS[:1], max_length=512)


# --------------------------------------------------------------------------- data


@needs_data
def test_gsm8k_and_mmlu_read_the_official_files():
    splits = gsm().splits()
    assert (len(splits["train"]), len(splits["test"])) == (7473, 1319)
    assert splits["test"][0]["answer"].endswith("#### 18")
    mmlu = Mmlu(MmluConfig(), DATA)
    test = mmlu.splits()["test"]
    assert len(test) == 14042 and len(mmlu.dev) == 285
    assert len({r["subject"] for r in test}) == 57 and all(r["answer"] in range(4) for r in test)


@needs_data
def test_mmlu_subjects_and_a_cap_per_subject():
    task = Mmlu(MmluConfig(subjects=["anatomy", "astronomy"], max_eval_examples=5), DATA)
    test = task.splits()["test"]
    assert [r["subject"] for r in test] == ["anatomy"] * 3 + ["astronomy"] * 2
    with pytest.raises(ValueError, match="unknown MMLU subject.*Valid choices"):
        Mmlu(MmluConfig(subjects=["astrology"]), DATA).splits()


@needs_data
def test_alpaca_falls_back_to_the_local_subset_offline(caplog):
    train = Mmlu(MmluConfig(max_train_examples=3), DATA).splits()["train"]
    assert len(train) == 3 and set(train[0]) == {"prompt", "input", "response"}
    assert "unverified provenance" in caplog.text


def test_bad_files_name_the_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not a JSON object"):
        Gsm8k(Gsm8kConfig(), tmp_path).splits()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: missing .*answer"):
        Gsm8k(Gsm8kConfig(), tmp_path).splits()
    with pytest.raises(DataError, match="test.jsonl not found"):
        (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
        Gsm8k(Gsm8kConfig(source="local"), tmp_path).splits()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"query": "q", "response": "The answer is: 1"}, {"query": "q2"}]))
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
    with pytest.raises(DataError, match="record 1: missing .*response"):
        Gsm8k(Gsm8kConfig(train_data="metamathqa", train_file=str(meta)), tmp_path).splits()
    folder = tmp_path / "mmlu" / "data" / "dev"
    folder.mkdir(parents=True)
    (folder / "anatomy_dev.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match="anatomy_dev.csv:1: answer 'E'"):
        Mmlu(MmluConfig(), tmp_path).load_splits()


def test_metamathqa_from_a_local_file(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    for split in ("train", "test"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
    meta = tmp_path / "MetaMathQA-395K.json"
    meta.write_text(json.dumps([{"query": f"q{i}", "response": f"The answer is: {i}"} for i in range(5)]))
    cfg = Gsm8kConfig(train_data="metamathqa", train_file=str(meta), max_train_examples=3)
    train = Gsm8k(cfg, tmp_path).splits()["train"]
    assert [r["prompt"] for r in train] == ["q0", "q1", "q2"]  # the first N, the study's slice


def test_oasst2_pairs_take_the_best_ranked_reply():
    rows = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi?", "lang": "en"},
            {"message_id": "a1", "parent_id": "p", "role": "assistant", "text": "second", "rank": 1, "lang": "en"},
            {"message_id": "a0", "parent_id": "p", "role": "assistant", "text": "best", "rank": 0, "lang": "en"},
            {"message_id": "q", "parent_id": None, "role": "prompter", "text": "Hola", "lang": "es"},
            {"message_id": "b", "parent_id": "q", "role": "assistant", "text": "Hola!", "rank": 0, "lang": "es"}]
    assert oasst2_pairs(rows, "en") == [{"prompt": "Hi?", "response": "best"}]
    assert len(oasst2_pairs(rows, None)) == 2
    with pytest.raises(DataError):
        oasst2_pairs(rows, "de")


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["gsm8k_gemma2_2b", "gsm8k_gemma2_2b_lora", "mmlu_gemma2_2b", "mmlu_gemma2_2b_lora",
                                  "gsm8k_llama32_3b_peft", "gsm8k_qwen2_7b"])
def test_llm_presets_compose_and_validate(name):
    spec = validate(compose_cfg(f"experiment={name}"))
    # the study's presets: fp32 as the released code (prepare_model_for_kbit_training); the PEFT benchmark: bf16
    assert spec.model.dtype == ("bfloat16" if name == "gsm8k_llama32_3b_peft" else "float32")
    assert spec.task.name in ("gsm8k", "mmlu")
    assert spec.trainer.name == "lm"


@pytest.mark.parametrize("config, family, targets, density, expected", [
    # the study: LoRA r64 on q/k/v/o of Gemma-2-2B
    ("gemma2_2b", "llama", "attention", "lora:64", 25_559_040),
    # the PEFT MetaMathQA benchmark: LoRA r32 on q/v of Llama-3.2-3B
    ("llama32_3b", "llama", "qv", "lora:32", 9_175_040),
])
def test_preset_budgets_match_the_published_counts(config, family, targets, density, expected):
    model = meta_causal_lm(config, vocab_size=256)  # the published shapes (a small vocabulary)
    shapes = target_shapes(find_targets(model, family, targets, None))
    assert Budget.parse(density).resolve(shapes) == expected


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    tiny_llama(len(tok), max_positions=2048).save_pretrained(folder)
    return [f"model.name_or_path={folder}", "model.package=null", "model.gguf_file=null", "task.max_length=256"]


FAST = ["debug=fast", "logger=none", "method.save_adapter=false", "trainer.grad_accum_steps=1",
        "trainer.max_steps=2", "task.max_train_examples=16", "metric.num_score_examples=8"]


@needs_data
@pytest.mark.parametrize("method", ["sparse", "lora", "full"])
def test_gsm8k_end_to_end_on_a_tiny_llama(tiny_lm, method, tmp_path):
    cfg = compose_cfg(*FAST, "task=gsm8k", "model=smollm2_135m", *tiny_lm, f"method={method}",
                      "task.max_eval_examples=3", "task.max_new_tokens=8", "task.eval_batch_size=2")
    run(cfg, run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed", data["error"]
    assert set(data["metrics"]) == {"test/strict_match", "test/flexible_extract"}
    assert data["main_metric"] == "test/flexible_extract" and data["evaluation"]["test"]["examples"] == 3
    lines = (tmp_path / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"completion", "strict", "flexible"} <= set(json.loads(lines[0]))
    assert data["trainable"].get("head", 0) == 0  # the LM head is pretrained: never a new head
    if method == "sparse":
        assert data["trainable_params"] == 8 * 2 * (32 + 32) + 8 * 2 * (32 + 16) * 2 + 8 * 2 * (32 + 32)


@needs_data
def test_mmlu_end_to_end_and_zero_shot(tiny_lm, tmp_path):
    cfg = compose_cfg(*FAST, "task=mmlu", "model=smollm2_135m", *tiny_lm, "task.subjects=[anatomy,astronomy]",
                      "task.max_eval_examples=4", "trainer.max_steps=0")
    result = run(cfg, run_dir=tmp_path)
    data = result.results
    assert data["status"] == "completed" and data["train_steps"] == 0
    assert set(data["metrics"]) == {"test/accuracy", "test/accuracy_macro", "test/subject/anatomy",
                                    "test/subject/astronomy"}
    preds = [json.loads(line) for line in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    assert {p["subject"] for p in preds} == {"anatomy", "astronomy"}
    assert data["metrics"]["test/accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))


def test_preflight_plans_a_gguf_model_without_de_quantising_it(tmp_path):
    plan = preflight(compose_cfg("task=gsm8k", "model=smollm2_135m", f"paths.cache_dir={tmp_path}"), tmp_path / "run")
    assert len(plan.shapes) == 30 * 4 and plan.entries == 8 * sum(o + i for o, i in plan.shapes.values())
    assert not (tmp_path / "models").exists() and not (tmp_path / "run").exists()


def test_preflight_reads_the_gguf_models_config_from_its_plain_copy_when_the_cache_holds_one(tmp_path):
    """Parsing the GGUF header takes seconds (it holds the tokenizer); the de-quantised copy's config.json is
    read instead when it exists. A stand-in copy with two layers shows which one was read."""
    cfg = compose_cfg("task=gsm8k", "model=smollm2_135m", f"paths.cache_dir={tmp_path}")
    header = preflight(cfg, tmp_path / "run")
    tiny_llama(64).config.save_pretrained(plain_copy(header.spec.model, tmp_path))
    plan = preflight(cfg, tmp_path / "run")
    assert len(header.shapes) == 30 * 4 and len(plan.shapes) == 2 * 4
    assert not (tmp_path / "run").exists()


def test_head_only_is_refused_for_a_pretrained_lm_head(tmp_path):
    with pytest.raises(ConfigError, match="pretrained LM head"):
        preflight(compose_cfg("task=mmlu", "model=smollm2_135m", "method=head_only"), tmp_path)


@needs_data
@pytest.mark.parametrize("task", ["gsm8k", "mmlu"])
def test_smollm2_end_to_end_from_the_command_line(task, tmp_path):
    """The issue's check, trimmed: the real packaged SmolLM2-135M trains a few steps and is evaluated."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    extra = (["task.max_eval_examples=2", "task.max_new_tokens=16"] if task == "gsm8k"
             else ["task.subjects=[anatomy,astronomy]", "task.max_eval_examples=4"])
    cmd = [sys.executable, "run.py", *FAST, f"task={task}", "model=smollm2_135m", "task.max_length=128",
           *extra, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed" and data["train_steps"] == 2
    preds = [json.loads(line) for line in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    field = "flexible_correct" if task == "gsm8k" else "correct"  # each task's main metric, per example
    assert data["metrics"][data["main_metric"]] == pytest.approx(sum(p[field] for p in preds) / len(preds))


@needs_data
def test_gradient_checkpointing_and_bf16_train_the_same_sparse_delta(tiny_lm, tmp_path):
    """Checkpointing recomputes activations: the trained values are those of a plain run. A bf16 base
    keeps fp32 sparse values that move in the same direction."""
    def values(tag: str, *extra: str) -> torch.Tensor:
        cfg = compose_cfg(*FAST, "task=gsm8k", "model=smollm2_135m", *tiny_lm, "task.max_eval_examples=1",
                          "task.max_new_tokens=2", *extra)
        model = run(cfg, run_dir=tmp_path / tag).model
        deltas = []  # dense deltas: the two dtypes' scores may select slightly different entries
        for m in sparse_layers(model).values():
            assert m.values.dtype == torch.float32
            deltas.append(torch.zeros(m.weight.numel()).index_copy_(0, m.indices.long(), m.values.detach()))
        return torch.cat(deltas)

    plain = values("plain")
    assert plain.abs().sum() > 0
    torch.testing.assert_close(values("ckpt", "trainer.gradient_checkpointing=true"), plain, rtol=1e-4, atol=1e-6)
    bf16 = values("bf16", "model.dtype=bfloat16")
    assert torch.nn.functional.cosine_similarity(bf16, plain, dim=0) > 0.8


def test_hub_revision_pins_the_training_dataset_only(monkeypatch):
    """task.hub_revision is the training data's commit: MMLU's questions, GSM8K's test split under MetaMathQA
    training and MBPP load at their own latest revision."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, revision=None, **kw:
                        calls.append((name, split, revision)) or [])
    gsm = Gsm8k(Gsm8kConfig(source="hub", hub_revision="abc", train_data="metamathqa"), None)
    gsm.hub("openai/gsm8k", "main", "test", training=False)
    gsm.hub("meta-math/MetaMathQA", None, "train")
    assert calls == [("openai/gsm8k", "test", None), ("meta-math/MetaMathQA", "train", "abc")]
    calls.clear()
    mmlu = Mmlu(MmluConfig(source="hub", hub_revision="abc"), None)
    assert mmlu.mmlu_split("test") == [] and calls == [("cais/mmlu", "test", None)]
