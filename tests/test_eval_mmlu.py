"""MMLU evaluator: the harness's prompt, log-likelihood scores (fast single-token path and general path)
against a brute-force forward per (context, continuation) on a tiny random Llama, left truncation, and
micro/macro accuracy on a crafted case."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from speft.evaluation import mmlu
from speft.evaluation.generation import encode_pair, loglikelihood

from .test_eval_gsm8k import tiny_llama, tiny_tokenizer

EXEMPLARS = [
    {"subject": "abstract_algebra", "question": "Find the order of the group Z_4. ",
     "choices": ["0", "4", "2", "6"], "answer": 1},
    {"subject": "abstract_algebra", "question": "Is every group abelian?",
     "choices": ["Yes", "No", "Only finite ones", "Only cyclic ones"], "answer": 1},
]
ROW = {"subject": "abstract_algebra", "question": " What is 2+2?\n", "choices": ["3", "4", "5", "6"], "answer": 1}


def test_prompt_matches_the_harness_format():
    assert mmlu.format_subject("high_school_us_history") == "high school us history"
    assert mmlu.build_prompt("abstract_algebra", EXEMPLARS, ROW) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the order of the group Z_4.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer: B\n\n"
        "Is every group abelian?\nA. Yes\nB. No\nC. Only finite ones\nD. Only cyclic ones\nAnswer: B\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def brute_force(model, tok, context: str, continuation: str, max_context: int | None = None) -> float:
    """One unbatched forward over context + continuation; sum of the continuation tokens' log-probs."""
    ctx, cont = encode_pair(tok, context, continuation)
    if max_context is not None:
        ctx = ctx[-(max_context + 1 - len(cont)):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def make_test_rows(n: int = 5) -> list[dict]:
    questions = ["What is 2+2?", "Which is prime?", "How many elements does the group have? " * 3, "x", "Pick one."]
    return [{"subject": "abstract_algebra" if i % 2 else "anatomy", "question": questions[i % len(questions)],
             "choices": [f"{i}", f"{i + 1}", "Natalia", "clips in May"], "answer": i % 4} for i in range(n)]


DEV = [dict(e, subject=s) for s in ("anatomy", "abstract_algebra") for e in EXEMPLARS + EXEMPLARS[:1]]


def test_scores_equal_brute_force_on_both_paths(tmp_path):
    tok = tiny_tokenizer()
    assert all(len(tok(" " + c, add_special_tokens=False)["input_ids"]) == 1 for c in mmlu.CHOICES)
    model = tiny_llama(len(tok), seed=3)
    model.train()
    test = make_test_rows()
    fast = mmlu.evaluate(model, tok, test, DEV, num_fewshot=2, batch_size=3, predictions_path=tmp_path / "fast.jsonl")
    assert model.training
    general = mmlu.evaluate(model, tok, test, DEV, num_fewshot=2, batch_size=4, fast_path=False,
                            predictions_path=tmp_path / "general.jsonl")
    rows_fast = [json.loads(line) for line in (tmp_path / "fast.jsonl").read_text().splitlines()]
    rows_general = [json.loads(line) for line in (tmp_path / "general.jsonl").read_text().splitlines()]
    model.eval()
    shots = mmlu.dev_exemplars(DEV, 2)
    for row, rf, rg in zip(test, rows_fast, rows_general):
        prompt = mmlu.build_prompt(row["subject"], shots[row["subject"]], row)
        expected = [brute_force(model, tok, prompt, " " + c) for c in mmlu.CHOICES]
        assert rf["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        assert rg["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        assert rf["prediction"] == max(range(4), key=lambda c: expected[c])
        assert set(rf) == {"index", "subject", "answer", "prediction", "loglikelihoods", "correct"}
    assert fast["accuracy"] == general["accuracy"]
    assert fast["num_examples"] == len(test) and fast["questions_per_s"] > 0


def test_general_loglikelihood_with_multi_token_continuations():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=4)
    requests = [("Question: Natalia sold 48 clips in April.\nAnswer:", " She sold 72 clips in May."),
                ("The following are multiple choice questions ", "(with answers) about abstract algebra."),
                ("Answer: ", "B\n\n"),  # the trailing space of the context moves to the continuation
                ("x", " y z")]
    assert len(encode_pair(tok, *requests[0])[1]) > 3
    got = loglikelihood(model, tok, requests, batch_size=3)
    expected = [brute_force(model, tok, c, x) for c, x in requests]
    assert got == pytest.approx(expected, abs=1e-4)
    assert encode_pair(tok, "Answer: ", "B") == encode_pair(tok, "Answer:", " B")


def test_left_truncation_keeps_the_end_of_the_prompt():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=5)
    test = make_test_rows(3)
    shots = mmlu.dev_exemplars(DEV, 2)
    prompts = [mmlu.build_prompt(r["subject"], shots[r["subject"]], r) for r in test]
    max_context = 24
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) > max_context for p in prompts)
    for fast_path in (True, False):
        got = mmlu.choice_loglikelihoods(model, tok, prompts, max_context=max_context, fast_path=fast_path)
        for prompt, lls in zip(prompts, got):
            expected = [brute_force(model, tok, prompt, " " + c, max_context=max_context) for c in mmlu.CHOICES]
            assert lls == pytest.approx(expected, abs=1e-4)
    full = mmlu.choice_loglikelihoods(model, tok, prompts)
    assert (torch.tensor(full) - torch.tensor(got)).abs().max() > 1e-4  # truncation did change the scores


def test_micro_and_macro_accuracy(monkeypatch, tmp_path):
    test = [{"subject": "anatomy", "question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": a}
            for i, a in enumerate([0, 1, 2])]
    test.append({"subject": "abstract_algebra", "question": "q3", "choices": ["a", "b", "c", "d"], "answer": 3})
    scores = [[0.0, -1.0, -2.0, -3.0],  # predicts A: right
              [-1.0, -0.5, -0.5, -3.0],  # tie B/C: the first maximum, B: right
              [-1.0, -2.0, -3.0, -4.0],  # predicts A: wrong
              [-1.0, -1.0, -1.0, -1.5]]  # predicts A: wrong
    monkeypatch.setattr(mmlu, "choice_loglikelihoods", lambda model, tok, prompts, **kw: scores[:len(prompts)])
    result = mmlu.evaluate(torch.nn.Linear(1, 1), None, test, DEV, num_fewshot=2,
                           predictions_path=tmp_path / "p.jsonl")
    assert result["accuracy"] == pytest.approx(2 / 4)
    assert result["subjects"] == {"abstract_algebra": 0.0, "anatomy": pytest.approx(2 / 3)}
    assert result["accuracy_macro"] == pytest.approx((2 / 3 + 0.0) / 2)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [0, 1, 0, 0]
    assert [r["correct"] for r in rows] == [True, True, False, False]


def test_exemplars_are_the_first_dev_rows_of_the_subject():
    dev = [{"subject": s, "question": f"{s}{i}", "choices": ["a", "b", "c", "d"], "answer": 0}
           for i in range(3) for s in ("anatomy", "virology")]
    shots = mmlu.dev_exemplars(dev, 2)
    assert [r["question"] for r in shots["virology"]] == ["virology0", "virology1"]
    with pytest.raises(ValueError, match="fewer than num_fewshot"):
        mmlu.evaluate(torch.nn.Linear(1, 1), None, [dict(dev[0], subject="nutrition")], dev, num_fewshot=2)


def test_scored_tokens_reach_the_host_once_per_batch(monkeypatch):
    """Log-probabilities are gathered on the device and copied once per batch (a float() per token
    would sync a GPU every time)."""
    from speft.evaluation.generation import evaluating, score_positions

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    rows = [[1, 2, 3, 4, 5], [1, 2, 3], [4, 5, 6, 7]]
    targets = [[(1, 3), (2, 4), (3, 5)], [(0, 2), (1, 3)], [(2, 7)]]
    with evaluating(model):
        expected = score_positions(model, rows, targets, pad=0, batch_size=2, device="cpu")
    floats = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: floats.append(1) or real_float(t))
    with evaluating(model):
        got = score_positions(model, rows, targets, pad=0, batch_size=2, device="cpu")
    assert not floats and got == expected and [len(g) for g in got] == [3, 2, 1]
    with evaluating(model):  # each value is the log-softmax at its position, as computed directly
        logits = model(input_ids=torch.tensor([rows[1]])).logits[0]
    assert got[1][1] == pytest.approx(float(F.log_softmax(logits[1].float(), -1)[3]), abs=1e-5)
