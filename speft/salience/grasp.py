"""``grasp``: W ⊙ (H g), GraSP's Hessian-gradient product (Wang et al., 2020), for fine-tuning selection.

g is the gradient, w.r.t. the target weights, of the mean temperature-scaled loss over the first half
of the scoring examples; H is the Hessian of the same loss over the second half,
w.r.t. the target weights (the block of the full Hessian on the flattened targets). H g comes from a
double backward per batch: z = ⟨∇ℓ_b, g⟩ with ``create_graph``, then ∇z = H_b g.

Temperature: as the released code (``model/sparse_peft.py``, ``compute_grasp_scores``: T = 200 applied
by patching ``CrossEntropyLoss``), cross-entropy losses (classification, language modelling) see
logits / T; a regression loss (STS-B's single output) is not tempered.

Reduction (``metric.reduction``): ``example`` (default) averages the per-example losses of each half, every
example weighing the same; ``batch`` averages, over each half's batches, the batch's loss as the model's own
head computes it, the released code's ``train_step`` (``loss / steps``): for a causal LM the mean over the
batch's labelled tokens, so long answers weigh more. The two are equal for classification and regression
with equal batches.

Examples: the metric asks for twice ``num_score_examples`` (``sample_factor = 2``): one half for g,
the other for H. When the training split holds fewer, the N examples available are split into the
first ⌈N/2⌉ (for g) and the remaining ⌊N/2⌋ (for H); a single example is used for both.

Sign: the original GraSP prunes with −W ⊙ Hg; this project selects entries to *train* with the
study's definition, score = W ⊙ Hg, highest first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from speft.config import check_choice, check_positive
from speft.registry import register
from speft.salience._functional import batch_mean_loss, forward_per_example, split_examples
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, accumulators, target_gradients, weight


@dataclass
class GraspConfig(MetricConfig):
    name: str = "grasp"
    temperature: float = 200.0  # logits / T before a cross-entropy loss (the released code; not regression)
    reduction: str = "example"  # example: each example weighs the same; batch: the released per-batch loss

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "metric", "temperature")
        check_choice("metric.reduction", self.reduction, REDUCTIONS)


REDUCTIONS = ("example", "batch")


def half_loss(model, batch: dict, examples: int, temperature: float, by_batch: bool) -> torch.Tensor:
    """A half's loss term of one batch: a batch mean (summed, then divided by the half's batches at the end: the
    gradients are linear in it) or the examples' losses over the half's size."""
    if by_batch:
        return forward_per_example(model, batch, temperature, reduce=batch_mean_loss)
    return forward_per_example(model, batch, temperature).sum() / examples


@register("metric", "grasp", schema=GraspConfig)
class Grasp(SalienceMetric):
    sample_factor = 2
    needs_float_weights = True  # a quantized base: the Hessian-vector product differentiates the weights twice

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        model, targets, temp = ctx.model, ctx.targets, self.cfg.temperature
        n1 = math.ceil(ctx.num_examples / 2)
        n2 = ctx.num_examples - n1
        second = 0 if n2 == 0 else 1  # a single example: the same half for g and H
        by_batch = self.cfg.reduction == "batch"
        loss = functools.partial(half_loss, model, temperature=temp, by_batch=by_batch)

        g = accumulators(targets, self.cfg.offload)
        batches = torch.zeros(2, device=next(iter(g.values())).device)  # per half (reduction=batch), reduced with g
        with target_gradients(model, targets, lambda name, grad: g[name].add_(grad.to(g[name].device))):
            for part, batch in split_examples(ctx.batches(), n1, ctx.offsets and ctx.offsets()):
                batches[part] += 1
                if part == 0:
                    loss(batch, n1).backward()
        ctx.reduce([*g.values(), batches])  # data-parallel: g over the whole first half, on every rank
        if by_batch:
            for buf in g.values():
                buf.div_(batches[0].item())

        hg = accumulators(targets, self.cfg.offload)
        names = list(targets)
        weights = [targets[n].weight for n in names]
        # The fused attention kernels have no double backward; the math kernel does.
        with target_gradients(model, targets, lambda name, grad: hg[name].add_(grad.to(hg[name].device))), \
                sdpa_kernel(SDPBackend.MATH):
            for part, batch in split_examples(ctx.batches(), n1, ctx.offsets and ctx.offsets()):
                if part != second:
                    continue
                grads = torch.autograd.grad(loss(batch, n2 or n1), weights, create_graph=True, allow_unused=True)
                z = sum((gr * g[n].to(gr.device, gr.dtype)).sum() for n, gr in zip(names, grads) if gr is not None)
                del grads
                if isinstance(z, torch.Tensor) and z.requires_grad:  # else no target is on the loss's path
                    z.backward()
        ctx.reduce(hg.values())
        if by_batch:  # H over the second half's batches (the first half's when there is a single example)
            for buf in hg.values():
                buf.div_(batches[second].item())
        return {name: buf.mul_(weight(targets[name], buf)) for name, buf in hg.items()}
