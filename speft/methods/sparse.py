"""``sparse``: train a salience-selected sparse delta on the target weights (SPEFT)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from speft.config import check, check_positive
from speft.methods.base import Method, MethodConfig, PrepareContext, Prepared, freeze_all
from speft.models.quantization import weight_numel
from speft.registry import register
from speft.sparse.io import save_adapter
from speft.sparse.layer import VALUES_GROUP, inject, sparse_layers
from speft.train import checkpoint
from speft.utils import timed

log = logging.getLogger(__name__)


@dataclass
class SparseMethodConfig(MethodConfig):
    name: str = "sparse"
    scaling: float = 1.0  # α in W0 + α·Δ, as in the reference implementation
    dropout: float = 0.0  # dropout on the delta's input (reference implementation; 0 keeps W0 + Δ merged)

    def __post_init__(self) -> None:
        check_positive(self, "method", "scaling")
        check(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")


@register("method", "sparse", schema=SparseMethodConfig)
class Sparse(Method):
    uses_salience = True

    @staticmethod
    def plan_budget(cfg: SparseMethodConfig, budget, shapes: dict[str, tuple[int, int]]) -> int:
        return budget.resolve(shapes)

    def save(self, model, folder, **info) -> bool:
        save_adapter(model, folder, **info)
        return True

    @staticmethod
    def trainable_state(model, optimizer=None) -> dict:
        """Each sparse layer's entries (``SparseDeltaLinear.checkpoint_state``: a dynamic mask changes which they
        are), then the other trainable parameters by name."""
        layers = sparse_layers(model)
        state = checkpoint.trainable_state(model, optimizer, skip=frozenset(id(m.values) for m in layers.values()))
        return {"sparse": {n: layer.checkpoint_state() for n, layer in layers.items()}, **state}

    @staticmethod
    @torch.no_grad()
    def load_trainable_state(model, state: dict, optimizer=None) -> None:
        """The sparse layers' saved entries replace their ``values`` (in ``optimizer`` too), then the rest."""
        layers = sparse_layers(model)
        if sorted(layers) != sorted(state["sparse"]):
            raise checkpoint.CheckpointError(f"the checkpoint's sparse modules ({len(state['sparse'])}) are not the "
                                             f"model's ({len(layers)})")
        swap = {id(layer.values): layer.load_checkpoint_state(state["sparse"][n]) for n, layer in layers.items()}
        if optimizer is not None and swap:
            for group in optimizer.param_groups:
                group["params"] = [swap.get(id(p), p) for p in group["params"]]
        checkpoint.load_trainable_state(model, state, optimizer)

    def prepare(self, ctx: PrepareContext, lr: float, head_lr: float) -> Prepared:
        with timed(ctx.timings, "scoring_s"):
            scores = ctx.scorer.score(ctx.model, ctx.targets)
        with timed(ctx.timings, "selection_s"):
            indices = ctx.mask.select(scores, ctx.entries)
        del scores
        freeze_all(ctx.model)
        layers = inject(ctx.model, indices, self.cfg.scaling, self.cfg.dropout)
        values = [layer.values for layer in layers.values()]
        for v in values:
            v.requires_grad_(True)
        head_groups, n_head = self.head_group(ctx, head_lr)
        mask = {n: {"selected": layer.values.numel(), "total": weight_numel(layer)} for n, layer in layers.items()}
        n_sparse = sum(v.numel() for v in values)
        log.info("sparse: %d entries in %d modules, head %d", n_sparse, len(layers), n_head)
        return Prepared(
            param_groups=[{"params": values, "lr": lr, "name": VALUES_GROUP}, *head_groups],
            trainable={"sparse": n_sparse, "head": n_head},
            target_trainable=n_sparse,
            mask=mask,
        )
