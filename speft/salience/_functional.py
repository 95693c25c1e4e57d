"""Shared pieces of the metrics that need more than the mean gradient: per-example losses, per-example
squared gradients of linear layers (closed form, batched), and splitting the scoring examples in two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from speft.salience.base import ScoreContext, accumulators, num_examples, target_gradients

# Per-example gradients are formed this many fp32 entries at a time (64 MiB), whatever the batch size.
CHUNK_ENTRIES = 2**24


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each example, shape (B,), matching the HF heads' losses for a batch of one.

    Classification logits (B, C): cross-entropy; a single regression output (B, 1) with float labels:
    squared error. Causal-LM logits (B, T, V): next-token cross-entropy averaged over the example's
    labelled tokens (labels -100 are ignored, e.g. padding and prompts).
    """
    if logits.dim() == 2:
        if is_regression(logits, labels):
            return (logits.squeeze(-1).float() - labels.float()).square()
        return F.cross_entropy(logits.float(), labels, reduction="none")
    tokens, counted = next_token_losses(logits, labels)
    return tokens.sum(1) / counted.sum(1).clamp_min(1)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM losses (B, T-1) of each next token (0 where the label is -100) and which tokens count."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none"), targets != -100


def batch_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch's loss as a Hugging Face head computes it for the whole batch: the mean over examples
    (classification, regression) or over the batch's labelled tokens (causal LM), not per example."""
    if logits.dim() == 2:
        return per_example_loss(logits, labels).mean()
    tokens, counted = next_token_losses(logits, labels)
    return tokens.sum() / counted.sum().clamp_min(1)


def is_regression(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """A single regression output (B, 1) with float labels: the loss is a squared error."""
    return logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point()


def forward_per_example(model: nn.Module, batch: dict, temperature: float = 1.0, *,
                        reduce=per_example_loss) -> torch.Tensor:
    """Per-example losses of a batch (or ``reduce``'s loss of it). Cross-entropy losses see the logits
    divided by ``temperature``; a regression loss never does (as the released code, which tempers
    ``CrossEntropyLoss`` only)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, labels = model(**inputs).logits, batch["labels"]
    if temperature != 1.0 and not is_regression(logits, labels):
        logits = logits / temperature
    return reduce(logits, labels)


def squared_gradient_mean(ctx: ScoreContext, offload: bool = False) -> dict[str, torch.Tensor]:
    """(1/N) Σ_i (∂ℓ_i/∂W)² per target weight: the empirical diagonal Fisher information.

    The per-example gradient of a linear layer is G_i = dY_iᵀ X_i, with X_i the layer's input and dY_i
    the gradient of ℓ_i at its output (the backward pass runs on Σ_i ℓ_i, so dY_i is not scaled by
    1/B). Padded positions (``attention_mask`` = 0) are zeroed in dY, so only real tokens count.
    Sequences are batched with ``bmm`` in chunks of at most :data:`CHUNK_ENTRIES` gradient entries;
    2-D inputs use the closed form Σ_i G_i² = (dY²)ᵀ(X²). One backward pass per batch, not per example.
    """
    acc = accumulators(ctx.targets, offload)
    state: dict = {}
    handles = []

    def on_forward(name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach()

        def on_grad(dy: torch.Tensor) -> None:
            acc[name].add_(_sum_squared_outer(dy, x, state.get("mask")).to(acc[name].device))

        out.register_hook(on_grad)

    for name, m in ctx.targets.items():
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: on_forward(name, mod, args, out)))
    try:
        with target_gradients(ctx.model, ctx.targets, lambda name, grad: None):  # weight gradients are dropped
            for batch in ctx.batches():
                state["mask"] = batch.get("attention_mask")
                forward_per_example(ctx.model, batch).sum().backward()
    finally:
        for h in handles:
            h.remove()
    ctx.reduce(acc.values())  # data-parallel: sums of squares over each rank's examples
    for buf in acc.values():
        buf.div_(ctx.num_examples)
    return acc


def _sum_squared_outer(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_i (dY_iᵀ X_i)² in fp32, for dY (B, [T,] out) and X (B, [T,] in)."""
    dy, x = dy.float(), x.float()
    if dy.dim() == 2:
        return dy.square().T @ x.square()
    dy, x = dy.reshape(dy.shape[0], -1, dy.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is not None and mask.shape == dy.shape[:2]:
        dy = dy * mask.unsqueeze(-1).to(dy.dtype)
    out_f, in_f = dy.shape[-1], x.shape[-1]
    total = torch.zeros(out_f, in_f, dtype=torch.float32, device=dy.device)
    chunk = max(1, CHUNK_ENTRIES // (out_f * in_f))
    for i in range(0, dy.shape[0], chunk):
        g = torch.bmm(dy[i : i + chunk].transpose(1, 2), x[i : i + chunk])  # (c, out, in): per-example gradients
        total.add_(g.square_().sum(0))
    return total


def split_examples(batches: Iterable[dict], first: int,
                   offsets: Iterable[int] | None = None) -> Iterator[tuple[int, dict]]:
    """``(part, batch)`` pairs: part 0 holds the first ``first`` examples, part 1 the rest. A batch that
    straddles the boundary is sliced in two (every tensor along its first dimension). ``offsets``: the
    position of each batch's first example in the whole sample (a rank's share in data-parallel
    scoring); None: the batches are consecutive from 0."""
    seen = 0
    offsets = iter(offsets) if offsets is not None else None
    for batch in batches:
        n = num_examples(batch)
        if offsets is not None:
            seen = next(offsets)
        cut = min(max(first - seen, 0), n)
        if cut > 0:
            yield 0, batch if cut == n else {k: v[:cut] for k, v in batch.items()}
        if cut < n:
            yield 1, batch if cut == 0 else {k: v[cut:] for k, v in batch.items()}
        seen += n
