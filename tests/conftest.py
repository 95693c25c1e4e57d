from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import speft.components  # noqa: F401
import speft.config  # noqa: F401

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on this 2-core machine: one torch thread each (and in the runs
    # they launch), since two multi-threaded torch processes slow each other down several-fold
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
# A debug=fast run spends half its time evaluating 64 examples per split; tests that check what trained, not the
# metric's value, evaluate 16.
FEW_EVAL = "task.max_eval_examples=16"
CONF = ROOT / "conf"


# `make test` hands whole files to its two workers in collection order (--dist loadfile --no-loadscope-reorder).
# The files that take longest (idle seconds as measured, slowest first) start first, so that the workers finish
# together instead of one running a minute-long file alone at the end; the rest follow in name order.
LONGEST_FIRST = ("test_distributed.py", "test_gpu_check.py", "test_lm_tasks.py", "test_sweeps.py",
                 "test_checkpoint.py", "test_bench.py", "test_memory.py", "test_methods.py", "test_metrics_e2e.py",
                 "test_cli.py", "test_masks.py", "test_report.py", "test_quantization.py", "test_config.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def compose_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def compose_config():
    return compose_cfg


class TinyClassifier(nn.Module):
    """Embedding -> two linear layers -> classifier, with an HF-style ``(**batch) -> .loss`` API."""

    def __init__(self, vocab: int = 50, dim: int = 8, labels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, 12)
        self.o = nn.Linear(12, dim)
        self.classifier = nn.Linear(dim, labels)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.emb(input_ids)
        h = self.o(torch.tanh(self.q(h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier((h * m).sum(1) / m.sum(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None

        class Out:
            pass

        out = Out()
        out.loss, out.logits = loss, logits
        return out


def tiny_batches(n: int = 10, seq: int = 6, batch: int = 4, vocab: int = 50, labels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    lengths = torch.randint(2, seq + 1, (n,), generator=g)
    for i, length in enumerate(lengths):
        mask[i, length:] = 0
    y = torch.randint(0, labels, (n,), generator=g)
    return [{"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch], "labels": y[i : i + batch]}
            for i in range(0, n, batch)]


@pytest.fixture
def tiny():
    model = TinyClassifier()
    return model, {"q": model.q, "o": model.o}, tiny_batches()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Score and model caches go to a per-session folder: tests neither read nor fill the user's cache."""
    import os

    old = os.environ.get("SPEFT_CACHE_DIR")
    os.environ["SPEFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("speft_cache"))
    yield
    if old is None:
        os.environ.pop("SPEFT_CACHE_DIR", None)
    else:
        os.environ["SPEFT_CACHE_DIR"] = old
