"""Salience metrics: one fp32 score per entry of every target weight; higher = more worth training.

A metric receives a :class:`ScoreContext` and returns ``{target name: scores shaped like its weight}``.
Only target weights get score buffers. Gradients of the targets are folded into their fp32
accumulators as soon as autograd produces them (post-accumulate-grad hooks) and freed at once, and
no other parameter keeps a gradient, so scoring needs the model, one batch's activations and one
fp32 buffer per target (``metric.offload=true`` keeps those buffers in CPU memory instead).

A metric leaves the model as it found it: weights, ``requires_grad`` flags and train/eval mode are
restored and no parameter keeps a ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch
from omegaconf import MISSING
from torch import nn

from speft.config import check_positive
from speft.models.quantization import dense_weight, float_weights, is_quantized, weight_shape


@dataclass
class MetricConfig:
    name: str = MISSING  # the option's name, the same as its YAML file
    num_score_examples: int = 1024  # training examples the scores are computed from (the study's default)
    batch_size: Optional[int] = None  # scoring batch size; null = trainer.batch_size
    cache: bool = True  # reuse scores saved under paths.cache_dir/scores for the same key; false = always compute
    offload: bool = False  # keep the fp32 score accumulators in CPU memory (large models on a GPU)

    def __post_init__(self) -> None:
        check_positive(self, "metric", "num_score_examples", "batch_size")


@dataclass
class ScoreContext:
    model: nn.Module
    targets: dict[str, nn.Linear]
    batches: Callable[[], Iterable[dict]]  # a fresh iterator over the scoring batches (on the device)
    num_examples: int  # examples the scores are computed from, over all ranks
    seed: int
    # Data-parallel scoring: `batches` yields this rank's share, `reduce` sums accumulators over the
    # ranks in place, `offsets` gives the position of each yielded batch's first example in the whole
    # sample (None: the batches are the whole sample, consecutive). One process: no-op and None.
    reduce: Callable[[Iterable[torch.Tensor]], None] = lambda tensors: None
    offsets: Optional[Callable[[], Iterable[int]]] = None


class SalienceMetric:
    """A salience metric. Class attributes describe its cost and data needs to the pipeline."""

    sample_factor = 1  # scoring examples drawn per `num_score_examples` (GraSP: 2, one half for g, one for H)
    data_free = False  # True when the scores do not depend on the examples (SynFlow)
    needs_float_weights = False  # True: scores a quantized base on its de-quantized weights (SynFlow, GraSP)

    def __init__(self, cfg: MetricConfig) -> None:
        self.cfg = cfg

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        """:meth:`score`, on de-quantized float layers for a metric that needs float weights on a quantized base
        (:func:`speft.models.quantization.float_weights`; nothing changes on a float base)."""
        if not self.needs_float_weights:
            return self.score(ctx)
        with float_weights(ctx.model, ctx.targets) as targets:
            return self.score(replace(ctx, targets=targets))

    def examples_used(self, ctx: ScoreContext) -> int:
        return 0 if self.data_free else ctx.num_examples


def num_examples(batch: dict) -> int:
    return int(batch["labels"].shape[0])


def accumulators(targets: dict[str, nn.Linear], offload: bool = False) -> dict[str, torch.Tensor]:
    """One zero fp32 buffer per target weight, on the weight's device or (``offload``) in CPU memory."""
    return {name: torch.zeros(weight_shape(m), dtype=torch.float32,
                              device="cpu" if offload else m.weight.device)
            for name, m in targets.items()}


@contextmanager
def target_gradients(model: nn.Module, targets: dict[str, nn.Linear],
                     fold: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Within the block only target weights require grad, and each target's gradient is handed to
    ``fold(name, grad)`` as soon as autograd has accumulated it, then freed. The model is in eval mode
    (no dropout: scores are a property of the pretrained weights), except for the modules that checkpoint
    activations (``gradient_checkpointing_enable``): transformers checkpoints only in training mode, and a
    7B model's scoring pass would otherwise keep every layer's activations. Flags and mode are restored
    after, and no parameter keeps a ``.grad``.

    A quantized target (bitsandbytes, ``model.quantization``) has no weight autograd can differentiate: its
    gradient with respect to the de-quantized weight is formed from the layer's input X and output gradient dY
    (dYᵀX over the tokens, in fp32), and the input embeddings' output requires grad so that dY reaches every
    layer, as QLoRA's preparation does."""
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for name, m in targets.items():
            if is_quantized(m):
                handles.append(m.register_forward_hook(partial(_output_gradient, name, fold)))
                continue
            w = m.weight
            w.requires_grad_(True)

            def hook(param: torch.Tensor, name: str = name) -> None:
                fold(name, param.grad)
                param.grad = None

            handles.append(w.register_post_accumulate_grad_hook(hook))
        if any(is_quantized(m) for m in targets.values()):
            handles.append(model.get_input_embeddings().register_forward_hook(_require_grad))
        model.eval()
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True  # this module alone: its children (dropout, attention) stay in eval mode
        yield
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def _require_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    out.requires_grad_(True)


def _output_gradient(name: str, fold: Callable[[str, torch.Tensor], None], module: nn.Module, args: tuple,
                     out: torch.Tensor) -> None:
    """Forward hook of a quantized target: when its output's gradient dY arrives, fold dYᵀX (the gradient of the
    de-quantized weight, summed over the tokens)."""
    x = args[0].detach()

    def on_grad(dy: torch.Tensor) -> None:
        fold(name, dy.reshape(-1, dy.shape[-1]).float().t().mm(x.reshape(-1, x.shape[-1]).float()))

    out.register_hook(on_grad)


def mean_gradient(ctx: ScoreContext, offload: bool = False, abs_per_batch: bool = False) -> dict[str, torch.Tensor]:
    """ḡ: gradient of the mean loss over all ``ctx.num_examples`` examples, per target weight (fp32).

    Batches are weighted by their size, so unequal batches give the mean over examples. With
    ``abs_per_batch`` the result is instead the example-weighted mean of the per-batch |gradients|.
    """
    acc = accumulators(ctx.targets, offload)

    def fold(name: str, grad: torch.Tensor) -> None:
        acc[name].add_((grad.abs() if abs_per_batch else grad).to(acc[name].device))

    with target_gradients(ctx.model, ctx.targets, fold):
        for batch in ctx.batches():
            loss = ctx.model(**batch).loss * (num_examples(batch) / ctx.num_examples)
            loss.backward()
    ctx.reduce(acc.values())  # data-parallel: each rank holds the sum over its batches
    return acc


def weight(module: nn.Linear, like: torch.Tensor) -> torch.Tensor:
    """The module's weight (de-quantized for a quantized base) as fp32 on the device of ``like`` (a score buffer)."""
    return dense_weight(module).detach().to(device=like.device, dtype=torch.float32)
