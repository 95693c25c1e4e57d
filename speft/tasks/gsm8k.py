"""``task=gsm8k``: fine-tune on GSM8K train or on MetaMathQA, evaluate k-shot on the GSM8K test set.

Training data (``task.train_data``):

* ``gsm8k``: the 7,473 training problems (``question`` → ``answer``, the worked solution ending in
  ``#### <number>``); local ``<data_dir>/gsm8k/train.jsonl``, else the Hub's ``openai/gsm8k`` (main);
* ``metamathqa``: MetaMathQA (``query`` → ``response``); local ``<data_dir>/metamathqa/MetaMathQA-395K.json``
  (the file of the Hub dataset ``meta-math/MetaMathQA``) or ``task.train_file``, else the Hub. The study
  trains on its first 100,000 records: ``task.max_train_examples=100000`` without ``subset_seed``.

Evaluation: the 1,319 test problems, ``num_fewshot`` exemplars from GSM8K train (``fewshot_sampler=harness``:
drawn per problem by lm-eval-harness's seeded sampler, so prompts equal the harness's; ``first_n``: the
first k for every problem), tokenised as the harness (the tokenizer's own BOS, once), greedy generation,
``strict_match`` and ``flexible_extract`` accuracy (:mod:`speft.evaluation.gsm8k`). Predictions go to
``predictions_test.jsonl`` beside ``results.json``.

``task.evaluation=nll`` scores the test problems' reference solutions instead: their mean token negative
log-likelihood under the training template (:mod:`speft.evaluation.nll`; main metric ``nll``, lower is
better; per problem in ``nll_test.jsonl``), and generates exact-match answers for the first
``task.generate_examples`` of them as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from speft.config import check_choice, check_positive
from speft.registry import register
from speft.tasks.lm import CausalLMTask, LMTaskConfig, check_train_data, read_json_list, read_jsonl

HUB_GSM8K = "openai/gsm8k"
HUB_METAMATHQA = "meta-math/MetaMathQA"
TRAIN_DATA = ("gsm8k", "metamathqa")
FEWSHOT = ("harness", "first_n")
EVALUATIONS = ("generate", "nll")


@dataclass
class Gsm8kConfig(LMTaskConfig):
    name: str = "gsm8k"
    train_data: str = "gsm8k"  # gsm8k | metamathqa
    hub_revision: Optional[str] = None  # a Hub commit of the training dataset, for reproducibility online
    max_new_tokens: int = 256  # the harness's generation limit for gsm8k
    fewshot_sampler: str = "harness"  # harness: k seeded draws per problem (lm-eval's sampler); first_n: one k for all
    # generate: the harness's exact match; nll: the reference solutions' mean token NLL (main metric, lower
    # is better), which separates small models' fine-tuning where exact match stays near zero
    evaluation: str = "generate"
    generate_examples: Optional[int] = None  # evaluation=nll: exact match on the first N problems too (null: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_train_data(self.name, self.train_data, TRAIN_DATA)
        check_positive(self, "task", "max_new_tokens")
        check_positive(self, "task", "generate_examples", allow_zero=True)
        check_choice("task.fewshot_sampler", self.fewshot_sampler, FEWSHOT)
        check_choice("task.evaluation", self.evaluation, EVALUATIONS)


@register("task", "gsm8k", schema=Gsm8kConfig)
class Gsm8k(CausalLMTask):
    main_metric = "flexible_extract"

    def __init__(self, cfg: Gsm8kConfig, data_dir=None) -> None:
        super().__init__(cfg, data_dir)
        if cfg.evaluation == "nll":
            self.main_metric = "nll"

    def gsm8k_split(self, split: str) -> list[dict]:
        path = self.local("gsm8k", f"{split}.jsonl")
        pinned = split == "train" and self.cfg.train_data == "gsm8k"  # hub_revision pins the training data only
        rows = read_jsonl(path, ("question", "answer")) if path else self.hub(HUB_GSM8K, "main", split, training=pinned)
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]

    def load_splits(self) -> dict[str, list[dict]]:
        gsm_train = self.gsm8k_split("train")
        self.fewshot_pool = gsm_train  # exemplars come from GSM8K train whatever the training data
        if self.cfg.train_data == "gsm8k":
            train = [{"prompt": r["question"], "response": r["answer"]} for r in gsm_train]
        else:
            path = self.train_path("metamathqa", "MetaMathQA-395K.json")
            rows = read_json_list(path, ("query", "response")) if path else self.hub(HUB_METAMATHQA, None, "train")
            train = [{"prompt": r["query"], "response": r["response"]} for r in rows]
        return {"train": train, "test": self.gsm8k_split("test")}

    def evaluate(self, split, model, tokenizer, rows, *, device, out_dir: Path, max_new_tokens=None):
        if self.cfg.evaluation == "nll":
            metrics, figures = self.evaluate_nll(split, model, tokenizer, rows, device=device, out_dir=out_dir)
            n = len(rows) if self.cfg.generate_examples is None else min(self.cfg.generate_examples, len(rows))
            if n:
                generated, throughput = self.evaluate_generate(split, model, tokenizer, rows[:n], device=device,
                                                               out_dir=out_dir, max_new_tokens=max_new_tokens)
                metrics.update(generated)
                figures.update(generated_examples=throughput["examples"], problems_per_s=throughput["problems_per_s"])
            return metrics, figures
        return self.evaluate_generate(split, model, tokenizer, rows, device=device, out_dir=out_dir,
                                      max_new_tokens=max_new_tokens)

    def evaluate_nll(self, split, model, tokenizer, rows, *, device, out_dir: Path):
        """The reference solutions' mean token NLL under the training template, untruncated."""
        import time

        from torch.utils.data import DataLoader

        from speft.evaluation.nll import IGNORE, mean_token_nll, response_nll
        from speft.utils import write_jsonl

        pairs = self.token_pairs(tokenizer, [{"prompt": r["question"], "response": r["answer"]} for r in rows])
        examples = [{"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)), "labels": [IGNORE] * len(p) + r}
                    for p, r in pairs]
        loader = DataLoader(examples, batch_size=self.cfg.eval_batch_size, collate_fn=self.collator(tokenizer))
        t0 = time.perf_counter()
        per_problem = response_nll(model, loader, device)
        elapsed = time.perf_counter() - t0
        write_jsonl(Path(out_dir) / f"nll_{split}.jsonl",
                    [{"index": i, "nll_sum": s, "tokens": n} for i, (s, n) in enumerate(per_problem)])
        tokens = sum(n for _, n in per_problem)
        return ({"nll": mean_token_nll(per_problem)},
                {"examples": len(rows), "scored_tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else 0.0})

    def evaluate_generate(self, split, model, tokenizer, rows, *, device, out_dir: Path, max_new_tokens=None):
        from speft.evaluation import gsm8k

        if self.cfg.fewshot_sampler == "harness":  # per problem, in test-file order: rows are the file's first N
            exemplars = gsm8k.fewshot_exemplars(self.fewshot_pool, len(rows), self.cfg.num_fewshot)
        else:
            exemplars = self.fewshot_pool[: self.cfg.num_fewshot]
        out = gsm8k.evaluate(model, tokenizer, rows, exemplars, device=device,
                             max_new_tokens=min(self.cfg.max_new_tokens, max_new_tokens or self.cfg.max_new_tokens),
                             batch_size=self.cfg.eval_batch_size, max_context=self.cfg.max_context,
                             predictions_path=Path(out_dir) / f"predictions_{split}.jsonl")
        metrics = {k: out[k] for k in ("strict_match", "flexible_extract")}
        return metrics, {"examples": out["num_examples"], "problems_per_s": out["problems_per_s"]}
