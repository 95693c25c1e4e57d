"""Benchmark evaluators that reproduce lm-evaluation-harness 0.4.13's prompts, tokenisation (the tokenizer's
BOS, added once) and scoring: GSM8K (greedy generation, strict and flexible exact match) and MMLU
(answer-letter log-likelihood). Compared with the harness itself in ``tests/test_eval_lm_eval_reference.py``;
each module's docstring says what is equal."""

from speft.evaluation import gsm8k, mmlu
from speft.evaluation.generation import generate_until, loglikelihood

__all__ = ["generate_until", "gsm8k", "loglikelihood", "mmlu"]
