"""Benchmark evaluators that reproduce lm-evaluation-harness's prompts, tokenisation and scoring:
GSM8K (greedy generation, strict and flexible exact match) and MMLU (answer-letter log-likelihood)."""

from speft.evaluation import gsm8k, mmlu
from speft.evaluation.generation import generate_until, loglikelihood

__all__ = ["generate_until", "gsm8k", "loglikelihood", "mmlu"]
