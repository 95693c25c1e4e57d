"""``synflow``: |W ⊙ ∂R/∂W| (Tanaka et al., 2020), data-free, R = the sum of the model's output logits
for an all-ones input on the "linearised" network. Two recipes (``metric.recipe``):

``released`` (default; the study's released code, ``model/sparse_peft.py``, ``compute_synflow_scores``):

* every floating-point parameter is replaced in place by its absolute value (sign bits kept, one
  bool per entry, and restored exactly);
* every *functional* activation of ``torch.nn.functional`` in the released list (relu, gelu, silu,
  tanh, sigmoid, glu, ..., and ``softmax``, ``softmin``, ``log_softmax``) is the identity during the
  pass. Attention (``metric.attention``): ``eager`` (default) runs Hugging Face models' eager attention for
  the pass, whose softmax is ``F.softmax`` and so becomes the identity too; ``model`` keeps the model's
  own implementation, where SDPA's fused softmax is not replaced. The released code patched only
  ``torch.nn.functional`` and left forcing eager attention commented out (``hack_forward``), so its runs on
  SDPA models (Qwen2, Gemma-2 on current transformers) most likely kept the attention softmax:
  ``attention=model`` reproduces that; with one all-ones token that softmax is 1 either way, the identity
  passes the raw score q·k/√d. Activation modules that call these functions (``nn.GELU``, ``nn.SiLU``, ...) follow;
  code that bypasses them (a function bound at construction, ``torch.tanh``) keeps its non-linearity,
  as in the released code;
* the input is one all-ones token: ``inputs_embeds`` of shape (1, 1, d) when the model's forward takes
  ``inputs_embeds`` (as the released code), else a one-token ``input_ids`` whose input-embedding output
  a forward hook replaces by ones (the same thing for models that add positions after that module).

``modules`` (this project's earlier variant): every activation *module* (``nn.GELU``, ``nn.SiLU``,
``nn.Tanh``, ... and the ``transformers.activations`` classes) is swapped for the identity; softmax and
normalisation layers are kept (with non-negative weights they only rescale); the input-embedding
output is all ones at batch size 1 and the padded length of the first scoring batch, with an
all-ones attention mask. The top-5 % masks of the two recipes overlap little (0.19 on OPT-350m).

Both: dropout off (eval mode); gradients w.r.t. the target weights only; afterwards the weights, the
patched functions and modules, ``requires_grad`` flags and the mode are restored, so the model and
its outputs are bit-identical.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speft.config import check_choice
from speft.registry import register
from speft.salience.base import MetricConfig, SalienceMetric, ScoreContext, accumulators, target_gradients, weight

ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.ReLU6)


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATIONS) or type(module).__module__ == "transformers.activations"


# The released code's list (compute_synflow_scores: activation_names), patched on torch.nn.functional.
FUNCTIONAL_ACTIVATIONS = (
    "threshold", "relu", "rrelu", "hardtanh", "relu6", "sigmoid", "hardsigmoid", "tanh", "silu", "mish",
    "hardswish", "elu", "celu", "selu", "glu", "gelu", "hardshrink", "leaky_relu", "logsigmoid", "softplus",
    "softshrink", "prelu", "softsign", "tanhshrink", "softmin", "softmax", "log_softmax",
)
RECIPES = ("released", "modules")
ATTENTION = ("eager", "model")


def _identity(x, *args, **kwargs):
    return x


@contextmanager
def identity_functionals() -> Iterator[None]:
    """``torch.nn.functional``'s activations (the released list, softmax included) are the identity inside."""
    saved = {name: getattr(F, name) for name in FUNCTIONAL_ACTIVATIONS if hasattr(F, name)}
    try:
        for name in saved:
            setattr(F, name, _identity)
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face attention through its eager path inside the block (its softmax is
    ``torch.nn.functional.softmax``, which the released recipe replaces; fused kernels would hide it)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


@contextmanager
def linearized(model: nn.Module, swap_modules: bool = True) -> Iterator[None]:
    """Absolute-valued parameters (and, with ``swap_modules``, identity activation modules) inside the
    block; exact restore after."""
    swapped = []
    for parent in list(model.modules()) if swap_modules else []:
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
    recipe: str = "released"  # released: identity functionals incl. softmax, one all-ones token; modules: see above
    attention: str = "eager"  # eager: the attention softmax is replaced too; model: the model's own (SDPA keeps it)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("metric.recipe", self.recipe, RECIPES)
        check_choice("metric.attention", self.attention, ATTENTION)


def takes_inputs_embeds(model: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@register("metric", "synflow", schema=SynflowConfig)
class Synflow(SalienceMetric):
    data_free = True
    needs_float_weights = True  # a quantized base: every weight replaced by its absolute value, so de-quantized

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        model, targets = ctx.model, ctx.targets
        first = next(iter(ctx.batches()))
        device = first["input_ids"].device
        released = self.cfg.recipe == "released"
        embeddings = input_embeddings(model)
        length = 1 if released else first["input_ids"].shape[1]
        inputs = {"input_ids": torch.zeros(1, length, dtype=torch.long, device=device),
                  "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
        hook = None
        if released and takes_inputs_embeds(model):
            dim = embeddings.weight.shape[1]
            inputs = {"inputs_embeds": torch.ones(1, 1, dim, dtype=embeddings.weight.dtype, device=device)}
        else:
            hook = embeddings.register_forward_hook(lambda mod, args, out: torch.ones_like(out))
        grads = accumulators(targets, self.cfg.offload)
        try:
            with linearized(model, swap_modules=not released), \
                    (identity_functionals() if released else nullcontext()), \
                    (eager_attention(model) if released and self.cfg.attention == "eager" else nullcontext()), \
                    target_gradients(model, targets, lambda name, g: grads[name].add_(g.to(grads[name].device))):
                model(**inputs).logits.float().sum().backward()
                scores = {name: buf.mul_(weight(targets[name], buf)).abs_() for name, buf in grads.items()}
        finally:
            if hook is not None:
                hook.remove()
        return scores
