"""``synflow``: |W ⊙ ∂R/∂W| (Tanaka et al., 2020), data-free.

As in the SynFlow paper's code and its zero-cost-proxy ports to transformers, the network is
"linearised" for one pass:

* every floating-point parameter (embeddings, norms, linear weights and biases) is replaced in
  place by its absolute value; the sign bits are kept (one bool per entry) and restored exactly;
* the input is all ones: a forward hook makes the input-embedding module output ones (so token
  identity plays no role; position/type embeddings and norms still apply), with an all-ones
  attention mask, batch size 1 and the padded length of the first scoring batch;
* non-linearities are bypassed: every activation *module* (``nn.GELU``, ``nn.SiLU``, ``nn.ReLU``,
  ``nn.Tanh``, ``nn.Sigmoid``, ... and the ``transformers.activations`` classes, e.g. BERT's GELU,
  Llama's SiLU, BERT's pooler tanh) is swapped for the identity during the pass. Activations written as
  plain function calls, softmax attention and normalisation layers are kept: with non-negative
  weights softmax and norms only rescale, which the paper's linearisation tolerates;
* dropout is off (eval mode); R = the sum of the model's output logits.

Gradients are taken w.r.t. the target weights only. Afterwards the weights, the swapped modules,
``requires_grad`` flags and the mode are restored, so the model and its outputs are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, accumulators, target_gradients, weight

ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.ReLU6)


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATIONS) or type(module).__module__ == "transformers.activations"


@contextmanager
def linearized(model: nn.Module) -> Iterator[None]:
    """Absolute-valued parameters and identity activations inside the block; exact restore after."""
    swapped = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_activation(child):
                swapped.append((parent, child_name, child))
    negative = {}
    try:
        for parent, child_name, _ in swapped:
            setattr(parent, child_name, nn.Identity())
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    negative[p] = torch.signbit(p)  # also catches -0.0
                    p.abs_()
        yield
    finally:
        with torch.no_grad():
            for p, neg in negative.items():
                p.copy_(torch.where(neg, -p, p))  # negation is exact: -|x| == x bit for bit
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)


def input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        module = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if module is None:
        raise ValueError("synflow needs an input embedding module (nn.Embedding) to feed an all-ones input")
    return module


@dataclass
class SynflowConfig(MetricConfig):
    name: str = "synflow"


@register("metric", "synflow", schema=SynflowConfig)
class Synflow(SalienceMetric):
    data_free = True

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        model, targets = ctx.model, ctx.targets
        first = next(iter(ctx.batches()))
        length = first["input_ids"].shape[1]
        device = first["input_ids"].device
        ids = torch.zeros(1, length, dtype=torch.long, device=device)
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        ones = input_embeddings(model).register_forward_hook(lambda mod, args, out: torch.ones_like(out))
        grads = accumulators(targets, self.cfg.offload)
        try:
            with linearized(model), \
                    target_gradients(model, targets, lambda name, g: grads[name].add_(g.to(grads[name].device))):
                model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
                scores = {name: buf.mul_(weight(targets[name], buf)).abs_() for name, buf in grads.items()}
        finally:
            ones.remove()
        return scores
