"""GSM8K evaluator: the harness's filters and exact-match preprocessing on crafted strings, the k-shot
prompt, and greedy batched generation on a tiny random Llama (batched == unbatched, stop strings, JSONL)
and on a fake model whose completions are fixed, so the accuracy is known exactly."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from speft.evaluation import gsm8k
from speft.evaluation.generation import StopOnStrings, cut_at_stops, generate_until

# --------------------------------------------------------------------------- tiny assets (shared with MMLU tests)

CORPUS = [
    "Question: Natalia sold 48 clips in April, and half as many clips in May. How many clips did she sell?\n"
    "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72\n\n",
    "Question: Weng earns $12 an hour. How much did she earn for 50 minutes?\nAnswer: She earned 0.2 x 50 = $10.\n"
    "#### 10\n\n",
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find the order of the group.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer: B\n\n",
    " A B C D Answer: A Answer: B Answer: C Answer: D The answer is 42. 1,234 -7 3.50 $18.",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory (GPT-2/SmolLM2 style): ``" A" .. " D"`` are single
    tokens, as with the real Llama/SmolLM2 tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 30, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 1024) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         eos_token_id=0, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------- filters and metric


@pytest.mark.parametrize("text, strict, flexible", [
    ("She made 1,234 dollars.\n#### 1,234", "1,234", "1,234"),
    ("So she makes $18.", "[invalid]", "$18."),
    ("The loss is -7 dollars.\n#### -7", "-7", "-7"),
    ("It costs 3.50 in total.\n#### 3.50", "3.50", "3.50"),
    ("No number at all here.", "[invalid]", "[invalid]"),
    ("2 apples and 3 pears make 5", "[invalid]", "5"),
    ("#### 12\nThen more text: #### 13", "12", "13"),  # strict: the first match; flexible: the last number
    ("Answer 7", "[invalid]", "7"),  # one digit: the second alternative of the flexible regex
])
def test_extraction_as_the_harness(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


def test_normalize_applies_regexes_to_ignore_then_lowercase():
    assert gsm8k.normalize("1,234") == "1234"
    assert gsm8k.normalize("$18.") == "18"
    assert gsm8k.normalize("3.50") == "3.50"  # only a trailing period goes
    assert gsm8k.normalize("Step one.\nStep two.\n#### 72") == "72"  # the reference: everything before ####
    assert gsm8k.normalize("[INVALID]") == "[invalid]"
    assert gsm8k.target_answer("She sold 72.\n#### 72") == "72"
    assert gsm8k.target_answer("x\n#### 1,234") == "1,234"


@pytest.mark.parametrize("completion, answer, strict_ok, flexible_ok", [
    (" 16 - 3 - 4 = 9 eggs, 9 * 2 = $18.\n#### 18", "... = <<9*2=18>>18\n#### 18", True, True),
    (" She makes $18.", "...\n#### 18", False, True),
    (" It is 1,234 in total.\n#### 1,234", "...\n#### 1234", True, True),
    (" The answer is 42.", "...\n#### 42", False, True),
    (" -3 degrees\n#### -3", "...\n#### -3", True, True),
    (" 3.5 dollars\n#### 3.5", "...\n#### 3.50", False, False),  # exact match is on strings, not numbers
    (" nothing", "...\n#### 5", False, False),
])
def test_exact_match_semantics(completion, answer, strict_ok, flexible_ok):
    assert gsm8k.is_correct(gsm8k.extract_strict(completion), answer) is strict_ok
    assert gsm8k.is_correct(gsm8k.extract_flexible(completion), answer) is flexible_ok
    # scoring against the full answer equals scoring against the extracted gold number
    assert gsm8k.normalize(gsm8k.target_answer(answer)) == gsm8k.normalize(answer)


def test_cut_at_stops_keeps_text_before_the_first_stop_string():
    text = " The answer is 42.\n\nQuestion: next one<|im_end|>"
    assert cut_at_stops(text, gsm8k.STOP) == " The answer is 42.\n\n"
    assert gsm8k.extract_flexible(cut_at_stops(text, gsm8k.STOP)) == "42."


# --------------------------------------------------------------------------- prompt


EXEMPLARS = [
    {"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A pen costs $2. How much do 4 pens cost?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
]


def test_prompt_matches_the_harness_format():
    prompt = gsm8k.build_prompt("What is 6 times 7?", EXEMPLARS)
    assert prompt == (
        "Question: Tom has 3 apples and buys 2 more. How many?\nAnswer: 3 + 2 = <<3+2=5>>5\n#### 5\n\n"
        "Question: A pen costs $2. How much do 4 pens cost?\nAnswer: 4 * 2 = <<4*2=8>>8\n#### 8\n\n"
        "Question: What is 6 times 7?\nAnswer:"
    )
    assert gsm8k.build_prompt("Q?", []) == "Question: Q?\nAnswer:"


# The train rows (0-based lines of gsm8k/train.jsonl, 7,473 rows) that lm-eval 0.4.13's sampler drew as the
# 5-shot exemplars of GSM8K test problems 0-4 (fewshot_random_seed 1234), read off the harness's own prompts
# by experiments/crosscheck/lm_eval_reference.py ("fewshot_train_indices" in tests/data/lm_eval/*.json).
HARNESS_DRAWS = [[6374, 3610, 957, 61, 742], [7462, 6610, 4769, 286, 5501], [5677, 687, 806, 6279, 2905],
                 [1939, 142, 252, 6461, 129], [2835, 5311, 5105, 3966, 5044]]
GSM8K_TRAIN_ROWS = 7473


def test_fewshot_exemplars_are_the_harness_draws():
    train = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(GSM8K_TRAIN_ROWS)]
    shots = gsm8k.fewshot_exemplars(train, num_problems=len(HARNESS_DRAWS), num_fewshot=5)
    assert [[int(gsm8k.target_answer(r["answer"])) for r in problem] for problem in shots] == HARNESS_DRAWS


# --------------------------------------------------------------------------- generation on a tiny Llama

PROBLEMS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many clips?",
     "answer": "48/2 = 24\n48+24 = 72\n#### 72"},
    {"question": "Weng earns $12 an hour.", "answer": "#### 10"},
    {"question": "How many?", "answer": "#### 3"},
    {"question": "She sold 1,234 clips in April and some more clips in May, for a longer question. How many?",
     "answer": "#### 1234"},
    {"question": "x", "answer": "#### 0"},
]


def test_batched_generation_equals_unbatched_and_writes_jsonl(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    model.train()  # evaluate must switch to eval and restore
    side = tok.padding_side
    clock = iter([100.0, 102.5])  # the generation's start and end: throughput = problems / 2.5 s
    monkeypatch.setattr(gsm8k.time, "perf_counter", lambda: next(clock, 102.5))
    one = gsm8k.evaluate(model, tok, PROBLEMS, EXEMPLARS, max_new_tokens=12, batch_size=1,
                         predictions_path=tmp_path / "b1.jsonl")
    monkeypatch.undo()
    assert one["problems_per_s"] == pytest.approx(len(PROBLEMS) / 2.5)
    four = gsm8k.evaluate(model, tok, PROBLEMS, EXEMPLARS, max_new_tokens=12, batch_size=4,
                          predictions_path=tmp_path / "b4.jsonl")
    assert model.training and tok.padding_side == side
    rows1 = [json.loads(line) for line in (tmp_path / "b1.jsonl").read_text().splitlines()]
    rows4 = [json.loads(line) for line in (tmp_path / "b4.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows1] == [r["completion"] for r in rows4]
    assert [r["index"] for r in rows4] == list(range(len(PROBLEMS)))  # input order despite length sorting
    assert [r["question"] for r in rows4] == [p["question"] for p in PROBLEMS]
    assert set(rows4[0]) == {"index", "question", "target", "completion", "strict", "flexible",
                             "strict_correct", "flexible_correct"}
    assert rows4[0]["target"] == "72"
    assert one["num_examples"] == four["num_examples"] == len(PROBLEMS)
    assert one["strict_match"] == four["strict_match"] and one["flexible_extract"] == four["flexible_extract"]
    assert four["problems_per_s"] > 0  # the real clock (the figure itself is checked on the fixed one above)

    # greedy: the same as a plain unpadded generate, cut at the stop strings
    prompt = gsm8k.build_prompt(PROBLEMS[3]["question"], EXEMPLARS)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)
    tokens = out[0, ids.shape[1]:].tolist()
    tokens = tokens[:tokens.index(0)] if 0 in tokens else tokens
    expected = cut_at_stops(tok.decode(tokens, skip_special_tokens=True), list(gsm8k.STOP) + [tok.eos_token])
    assert rows4[3]["completion"] == expected


def test_generation_stops_early_and_cuts_at_the_stop_string():
    """Stop strings that the random model is bound to produce (single characters) end generation early."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    prompts = [gsm8k.build_prompt(p["question"], EXEMPLARS) for p in PROBLEMS[:3]]
    free = generate_until(model, tok, prompts, stop=(), max_new_tokens=24, batch_size=3)
    stop = tuple({c for text in free for c in text[1:3] if c.strip()})  # characters the model emits early on
    assert stop
    cut = generate_until(model, tok, prompts, stop=stop, max_new_tokens=24, batch_size=3)
    for full, short in zip(free, cut):
        assert short == cut_at_stops(full, stop)
        assert not any(s in short for s in stop)


def test_stop_criterion_is_per_row():
    tok = tiny_tokenizer()
    prompt = tok("Answer:", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(" 42.\n\nQuestion: more", add_special_tokens=False)["input_ids"],
            prompt + tok(" 42 and 7 more", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    done = StopOnStrings(tok, gsm8k.STOP, len(prompt))(ids, None)
    assert done.tolist() == [True, False]
    # the stop string in the prompt does not count
    assert StopOnStrings(tok, ("Answer:",), len(prompt))(ids, None).tolist() == [False, False]


# --------------------------------------------------------------------------- fake model: fixed completions


class FixedCompletions(nn.Module):
    """``generate`` appends a fixed text to each prompt, chosen by the question it ends with."""

    def __init__(self, tokenizer, completions: dict[str, str]) -> None:
        super().__init__()
        self.tok = tokenizer
        self.completions = completions
        self.weight = nn.Parameter(torch.zeros(1))
        self.prompt_lengths: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()].tolist())
            self.prompt_lengths.append(int(mask.sum()))
            question = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
            rows.append(ids.tolist() + self.tok(self.completions[question], add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_fixed_completions_give_the_known_accuracy(tmp_path):
    tok = tiny_tokenizer()
    problems = [
        {"question": "q1", "answer": "#### 72"},
        {"question": "q2", "answer": "#### 1234"},
        {"question": "q3", "answer": "#### 18"},
        {"question": "q4", "answer": "#### 5"},
        {"question": "q5", "answer": "#### 42"},
    ]
    completions = {
        "q1": " 48+24 = 72.\n#### 72\n\nQuestion: filler #### 99",  # both right; the cut drops "#### 99"
        "q2": " It is 1,234 in total.\n#### 1,234",  # both right after normalisation
        "q3": " She makes $18.<|endoftext|> 99 #### 99",  # no ####: strict invalid; flexible "$18." is right
        "q4": " 2 + 2 = 4\n#### 4",  # both wrong
        "q5": " The answer is 42.\n\nQuestion: 7 more<|im_end|>",  # flexible right after the cut at "Question:"
    }
    model = FixedCompletions(tok, completions)
    result = gsm8k.evaluate(model, tok, problems, EXEMPLARS, batch_size=2, predictions_path=tmp_path / "p.jsonl")
    assert result["strict_match"] == pytest.approx(2 / 5)
    assert result["flexible_extract"] == pytest.approx(4 / 5)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["completion"] == " 48+24 = 72.\n#### 72\n\n"
    assert rows[2]["completion"] == " She makes $18."  # cut at EOS
    assert rows[2]["strict"] == "[invalid]" and rows[2]["flexible"] == "$18."
    assert rows[4]["completion"] == " The answer is 42.\n\n"
    assert [r["strict_correct"] for r in rows] == [True, True, False, False, False]
    assert [r["flexible_correct"] for r in rows] == [True, True, True, False, True]


def test_per_problem_exemplars_and_left_truncation():
    tok = tiny_tokenizer()
    problems = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    model = FixedCompletions(tok, {"q1": " 1\n#### 1", "q2": " 3\n#### 3"})
    result = gsm8k.evaluate(model, tok, problems, [EXEMPLARS[:1], EXEMPLARS], batch_size=2)
    assert result["strict_match"] == 0.5
    lengths = sorted(model.prompt_lengths)
    assert lengths[0] < lengths[1]  # one and two exemplars
    model.prompt_lengths.clear()
    gsm8k.evaluate(model, tok, problems, EXEMPLARS, batch_size=2, max_context=40, max_new_tokens=30)
    assert model.prompt_lengths == [10, 10]  # max_context - max_new_tokens tokens, the end of the prompt kept
    with pytest.raises(ValueError, match="exemplar lists"):
        gsm8k.evaluate(model, tok, problems, [EXEMPLARS], batch_size=2)
