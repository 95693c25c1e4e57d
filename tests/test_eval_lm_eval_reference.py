"""``speft.evaluation`` against lm-evaluation-harness 0.4.13 itself: the per-item records that
``experiments/crosscheck/lm_eval_reference.py`` wrote by running the harness (``tests/data/lm_eval/``) on

- ``tiny_bos_llama``: a tiny random Llama whose tokenizer adds ``<s>`` (rebuilt here from the same seed,
  ``tests/tiny_bos_llama.py``), the case SmolLM2 cannot show: BOS added once, at the start of prompts and
  contexts, never twice, cut off by left truncation;
- ``smollm2_135m``: the packaged SmolLM2-135M (its tokenizer adds no BOS), real completions and scores.

Compared exactly: token ids (length, head, SHA-256), prompt strings, completions, extractions, scores,
few-shot draws; log-likelihoods within 1e-4."""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile

import pytest

from speft.evaluation import gsm8k, mmlu
from speft.evaluation.generation import (
    encode,
    encode_pair,
    encode_prompt,
    encode_request,
    generate_until,
    loglikelihood,
)

from . import tiny_bos_llama
from .conftest import ROOT, compose_cfg

REF = ROOT / "tests" / "data" / "lm_eval"
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").exists(), reason="../shared/data not present")
TOL = 1e-4  # log-likelihoods: the harness batches and pads differently (no attention mask, other widths)
SMOLLM2 = pytest.param("smollm2_135m", marks=pytest.mark.slow)  # about a minute on 2 CPU cores
MODELS = ["tiny_bos_llama", SMOLLM2]


def digest(ids) -> dict:
    """As the script's ``ids_digest``."""
    ids = [int(i) for i in ids]
    return {"len": len(ids), "head": ids[:4], "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


@functools.cache
def reference(name: str) -> dict:
    return json.loads((REF / f"{name}.json").read_text())


@functools.cache
def model_and_tokenizer(name: str):
    """The model as speft loads it: the tiny Llama saved and reloaded like a Hub folder; SmolLM2 through
    ``speft.models.loading`` (GGUF de-quantised to float32, as the harness ran it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny_bos_llama":
        with tempfile.TemporaryDirectory() as tmp:
            tiny_bos_llama.save(tmp)
            return AutoModelForCausalLM.from_pretrained(tmp).eval(), AutoTokenizer.from_pretrained(tmp)
    from speft.models.loading import load_model, load_tokenizer

    cfg = compose_cfg("model=smollm2_135m").model
    return load_model(cfg, "causal_lm", None).eval(), load_tokenizer(cfg)


@functools.cache
def tokenizer(name: str):
    """The model's tokenizer; SmolLM2's alone (no model weights de-quantised for a check of token ids)."""
    if name != "smollm2_135m":
        return model_and_tokenizer(name)[1]
    from speft.models.loading import load_tokenizer

    return load_tokenizer(compose_cfg("model=smollm2_135m").model)


def test_the_tiny_tokenizer_adds_its_bos_and_the_harness_kept_one():
    ref = reference("tiny_bos_llama")
    _, tok = model_and_tokenizer("tiny_bos_llama")
    assert ref["settings"]["tokenizer_adds_bos"] and not reference("smollm2_135m")["settings"]["tokenizer_adds_bos"]
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert tok("<s>x")["input_ids"][:2] == [tok.bos_token_id] * 2  # what a naive encode does with a BOS text
    for item in ref["gsm8k"]:
        assert item["prompt_ids"]["head"][0] == tok.bos_token_id != item["prompt_ids"]["head"][1]
    with_bos = [r for r in ref["requests"]["loglikelihood"] if r["context"].startswith("<s>")]
    assert with_bos and all(r["context_ids"]["head"][1] != tok.bos_token_id for r in with_bos)


@pytest.mark.parametrize("name", ["tiny_bos_llama", pytest.param("smollm2_135m")])
def test_token_ids_equal_the_harness(name):
    """Prompts (``tok_encode``), request pairs (``_encode_pair``), empty contexts (prefix token), contexts
    that already start with the BOS text, and a generation batch (``tok_batch_encode``)."""
    ref = reference(name)
    tok = tokenizer(name)
    for item in ref["gsm8k"]:
        assert digest(encode(tok, item["prompt"])) == item["prompt_ids"]
        assert digest(encode_prompt(tok, item["prompt"])) == item["prompt_ids"]
    for item in ref["mmlu"]:
        pairs = [encode_pair(tok, item["prompt"], c) for c in item["continuations"]]
        assert [digest(ctx) for ctx, _ in pairs] == [item["context_ids"]] * 4
        assert [cont for _, cont in pairs] == item["continuation_ids"]
    for r in ref["requests"]["loglikelihood"]:
        ctx, cont = encode_request(tok, r["context"], r["continuation"])
        assert digest(ctx) == r["context_ids"] and cont == r["continuation_ids"], r["context"][:40]
    for r in ref["requests"]["generate_until"]:
        assert digest(encode_prompt(tok, r["prompt"])) == r["prompt_ids"]


def max_loglikelihood_difference(name: str) -> float:
    ref = reference(name)
    model, tok = model_and_tokenizer(name)
    prompts = [item["prompt"] for item in ref["mmlu"]]
    expected = [item["loglikelihoods"] for item in ref["mmlu"]]
    worst = 0.0
    for fast_path in (True, False):
        got = mmlu.choice_loglikelihoods(model, tok, prompts, batch_size=ref["settings"]["batch_size"],
                                         fast_path=fast_path)
        worst = max(worst, max(abs(g - e) for gs, es in zip(got, expected) for g, e in zip(gs, es)))
        assert [max(range(4), key=lambda c: (lls[c], -c)) for lls in got] == [i["prediction"] for i in ref["mmlu"]]
    requests = ref["requests"]["loglikelihood"]
    got = loglikelihood(model, tok, [(r["context"], r["continuation"]) for r in requests], batch_size=2)
    return max(worst, max(abs(g - r["loglikelihood"]) for g, r in zip(got, requests)))


@pytest.mark.parametrize("name", MODELS)
def test_loglikelihoods_equal_the_harness(name):
    """MMLU choice scores (fast and general path) and the edge-case requests, within 1e-4."""
    assert max_loglikelihood_difference(name) < TOL


@pytest.mark.parametrize("name", MODELS)
def test_completions_and_scores_equal_the_harness(name):
    ref = reference(name)
    model, tok = model_and_tokenizer(name)
    items = ref["gsm8k"]
    got = generate_until(model, tok, [i["prompt"] for i in items], stop=gsm8k.STOP,
                         max_new_tokens=ref["settings"]["max_gen_toks"], batch_size=ref["settings"]["batch_size"])
    assert got == [i["completion"] for i in items]
    for item in items:
        assert gsm8k.extract_strict(item["completion"]) == item["strict"]
        assert gsm8k.extract_flexible(item["completion"]) == item["flexible"]
    extra = ref["requests"]["generate_until"]  # a prompt that starts with the BOS text: its BOS once
    assert generate_until(model, tok, [r["prompt"] for r in extra], stop=gsm8k.STOP,
                          max_new_tokens=ref["settings"]["max_gen_toks"]) == [r["completion"] for r in extra]


def test_left_truncation_equals_the_harness():
    """``max_length`` 64 on the tiny model: the prompts lose their start, BOS included, as in the harness."""
    ref = reference("tiny_bos_llama")
    model, tok = model_and_tokenizer("tiny_bos_llama")
    short = ref["truncated"]
    prompts = [ref["mmlu"][r["prompt_index"]]["prompt"] for r in short["mmlu"]]
    for fast_path in (True, False):
        got = mmlu.choice_loglikelihoods(model, tok, prompts, max_context=short["max_length"], fast_path=fast_path)
        for lls, r in zip(got, short["mmlu"]):
            assert lls == pytest.approx(r["loglikelihoods"], abs=TOL)
    assert got != [ref["mmlu"][r["prompt_index"]]["loglikelihoods"] for r in short["mmlu"]]  # it did truncate
    prompts = [ref["gsm8k"][r["prompt_index"]]["prompt"] for r in short["gsm8k"]]
    got = generate_until(model, tok, prompts, stop=gsm8k.STOP, max_new_tokens=ref["settings"]["max_gen_toks"],
                         batch_size=ref["settings"]["batch_size"], max_context=short["max_length"])
    assert got == [r["completion"] for r in short["gsm8k"]]


def test_the_recorded_draws_are_those_test_eval_gsm8k_checks():
    from .test_eval_gsm8k import HARNESS_DRAWS

    for name in ("tiny_bos_llama", "smollm2_135m"):
        assert [i["fewshot_train_indices"] for i in reference(name)["gsm8k"]] == HARNESS_DRAWS


# --------------------------------------------------------------------------- from the data: prompts and scores


def gsm8k_rows(split: str) -> list[dict]:
    with (DATA / "gsm8k" / f"{split}.jsonl").open() as f:
        return [json.loads(line) for line in f]


@needs_data
@pytest.mark.parametrize("name", ["tiny_bos_llama", "smollm2_135m"])
def test_prompts_and_fewshot_draws_equal_the_harness(name):
    from speft.tasks.lm import read_csv_rows

    ref = reference(name)
    train, test = gsm8k_rows("train"), gsm8k_rows("test")
    n = max(i["doc_id"] for i in ref["gsm8k"]) + 1
    shots = gsm8k.fewshot_exemplars(train, n, ref["settings"]["num_fewshot"])
    for item in ref["gsm8k"]:
        assert [train[i] for i in item["fewshot_train_indices"]] == shots[item["doc_id"]]
        assert gsm8k.build_prompt(test[item["doc_id"]]["question"], shots[item["doc_id"]]) == item["prompt"]
        answer = test[item["doc_id"]]["answer"]
        assert gsm8k.is_correct(item["strict"], answer) is item["strict_correct"]
        assert gsm8k.is_correct(item["flexible"], answer) is item["flexible_correct"]

    def mmlu_rows(subject: str, split: str) -> list[dict]:
        path = DATA / "mmlu" / "data" / split / f"{subject}_{split}.csv"
        return [{"subject": subject, "question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                for r in read_csv_rows(path, 6)]

    for item in ref["mmlu"]:
        dev = mmlu.dev_exemplars(mmlu_rows(item["subject"], "dev"), ref["settings"]["num_fewshot"])
        row = mmlu_rows(item["subject"], "test")[item["doc_id"]]
        assert mmlu.build_prompt(item["subject"], dev[item["subject"]], row) == item["prompt"]
        assert row["answer"] == item["answer"]


@needs_data
def test_gsm8k_evaluate_scores_equal_the_harness(tmp_path):
    """``gsm8k.evaluate`` end to end on the tiny model: per-problem extractions and exact-match scores."""
    ref = reference("tiny_bos_llama")
    model, tok = model_and_tokenizer("tiny_bos_llama")
    train, test = gsm8k_rows("train"), gsm8k_rows("test")
    items = ref["gsm8k"]
    exemplars = gsm8k.fewshot_exemplars(train, len(items), ref["settings"]["num_fewshot"])
    gsm8k.evaluate(model, tok, test[:len(items)], exemplars, max_new_tokens=ref["settings"]["max_gen_toks"],
                   batch_size=ref["settings"]["batch_size"], predictions_path=tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    keys = ("completion", "strict", "flexible", "strict_correct", "flexible_correct")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: i[k] for k in keys} for i in items]
