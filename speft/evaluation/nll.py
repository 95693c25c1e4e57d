"""The mean token negative log-likelihood of reference responses: a causal-LM evaluation that separates
fine-tuning methods long before exact match does (a 135M model solves few GSM8K problems either way).

Each example is encoded as for training (the task's template: prompt tokens without loss, then the
reference response and the end-of-sequence token), and the score is the negative log-likelihood summed
over every response token of every example, divided by their number (a token-weighted mean, so a long
solution counts for its length, as in the training loss). Natural log, in nats per token.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

IGNORE = -100  # the label of tokens without loss (prompt and padding)


@torch.no_grad()
def response_nll(model: nn.Module, loader: DataLoader, device: torch.device) -> list[tuple[float, int]]:
    """Per example, in the loader's order: (summed NLL, scored tokens) of its labelled tokens. Batches hold
    ``input_ids``, ``attention_mask`` and ``labels`` (:data:`IGNORE` where nothing is scored)."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        for batch in loader:
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            target = labels[:, 1:]  # position t predicts token t + 1
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                  reduction="none").view_as(target).double()
            sums, counts = nll.sum(1).cpu().tolist(), (target != IGNORE).sum(1).cpu().tolist()
            out += list(zip(sums, counts))
    finally:
        model.train(was_training)
    return out


def mean_token_nll(per_example: list[tuple[float, int]]) -> float:
    """Summed NLL over summed tokens (a token-weighted mean)."""
    tokens = sum(n for _, n in per_example)
    return sum(s for s, _ in per_example) / tokens if tokens else float("nan")
