"""GSM8K's ``evaluation=nll``: the reference solutions' mean token NLL, against a token-by-token brute force
on a tiny random Llama; padding and batching change nothing; lower is better in the pipeline and report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from speft.evaluation.nll import mean_token_nll
from speft.registry import ConfigError
from speft.tasks.gsm8k import Gsm8k, Gsm8kConfig
from speft.tasks.lm import IGNORE

from .conftest import ROOT
from .test_eval_gsm8k import tiny_llama, tiny_tokenizer

DATA = ROOT.parent / "shared" / "data"
PROBLEMS = [{"question": "Natalia sold 48 clips in April, and half as many in May. How many clips?",
             "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72.\n#### 72"},
            {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "0.2 x 50 = $10.\n#### 10"},
            {"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"}]


def padded_tokenizer():
    """The tiny tokenizer with a pad token, as speft.models.loading.load_tokenizer sets it (a copy: the
    cached one is shared with other tests)."""
    tok = copy.deepcopy(tiny_tokenizer())
    tok.pad_token = tok.eos_token
    return tok


def brute_force(model, tok, task, row) -> tuple[float, int]:
    """One unpadded sequence; -log p(token | everything before it), summed over the solution and EOS."""
    prompt, response = task.texts({"prompt": row["question"], "response": row["answer"]})
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return -sum(float(logp[t - 1, ids[0, t]]) for t in range(len(p), len(p) + len(r))), len(r)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_nll_equals_a_token_by_token_brute_force(tmp_path, batch_size):
    tok = padded_tokenizer()
    model = tiny_llama(len(tok))
    task = Gsm8k(Gsm8kConfig(evaluation="nll", generate_examples=0, eval_batch_size=batch_size), DATA)
    metrics, figures = task.evaluate("test", model, tok, PROBLEMS, device=torch.device("cpu"), out_dir=tmp_path)
    expected = [brute_force(model, tok, task, row) for row in PROBLEMS]
    assert metrics["nll"] == pytest.approx(sum(s for s, _ in expected) / sum(n for _, n in expected), rel=1e-5)
    per_problem = [json.loads(line) for line in (tmp_path / "nll_test.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in per_problem] == [n for _, n in expected]
    assert [p["nll_sum"] for p in per_problem] == pytest.approx([s for s, _ in expected], rel=1e-5)
    assert figures["scored_tokens"] == sum(n for _, n in expected) and "strict_match" not in metrics
    assert model.training is False


def test_nll_mode_also_generates_the_first_problems(tmp_path):
    tok = padded_tokenizer()
    task = Gsm8k(Gsm8kConfig(evaluation="nll", generate_examples=2, num_fewshot=0, max_new_tokens=8), DATA)
    task.fewshot_pool = []  # set by load_splits; zero-shot here
    assert task.main_metric == "nll"
    metrics, figures = task.evaluate("test", tiny_llama(len(tok)), tok, PROBLEMS, device=torch.device("cpu"),
                                     out_dir=tmp_path)
    assert {"nll", "strict_match", "flexible_extract"} <= set(metrics) and figures["generated_examples"] == 2
    assert len((tmp_path / "predictions_test.jsonl").read_text().splitlines()) == 2


def test_mean_is_token_weighted_and_bad_values_are_refused():
    assert mean_token_nll([(2.0, 1), (6.0, 3)]) == pytest.approx(2.0)
    assert math.isnan(mean_token_nll([]))
    with pytest.raises(ConfigError, match="task.evaluation='ppl' is not valid. Valid choices: generate, nll"):
        Gsm8kConfig(evaluation="ppl")
    with pytest.raises(ConfigError, match="generate_examples=-1 must be >= 0"):
        Gsm8kConfig(evaluation="nll", generate_examples=-1)
    assert IGNORE == -100


def test_lower_is_better_for_nll_in_the_pipeline_and_the_report():
    from speft.recipe import best_evaluation
    from speft.report.tables import Cell, Table

    task = Gsm8k(Gsm8kConfig(evaluation="nll"), DATA)
    history = [{"test/nll": 1.2, "step": 1}, {"test/nll": 0.9, "step": 2}, {"test/nll": 1.0, "step": 3}]
    assert best_evaluation(history, task)["step"] == 2
    table = Table(row_keys=["method.name"], col_keys=["task.name"], rows=["a", "b"], cols=["gsm8k"],
                  row_values={}, cells={("a", "gsm8k"): Cell([1.2]), ("b", "gsm8k"): Cell([0.9])},
                  metrics={"gsm8k": ["test/nll"]}, value="final", scale=1, digits=3)
    assert table.best() == {"gsm8k": {"b"}, "Average": {"b"}}
