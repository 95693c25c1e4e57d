"""Every method runs end to end; LoRA-family counts match the sparse budget; only the method's
parameters change."""

from __future__ import annotations

import json
import re

import pytest
import torch

from speft import registry
from speft.models.loading import load_model
from speft.pipeline import run
from speft.registry import ConfigError

from .conftest import FEW_EVAL, compose_cfg

METHODS = registry.names("method")
LORA_R8 = 8 * 768 * 24  # r·(in+out) for q, k, v, o of MiniLM's 6 layers
HEAD = 384 * 2 + 2


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_and_trains_only_its_parameters(name, tmp_path):
    result = run(compose_cfg("debug=fast", "logger=none", FEW_EVAL, f"method={name}"), run_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "completed" and "test/accuracy" in data["metrics"]
    assert data["trainable"]["head"] == HEAD
    from transformers import set_seed

    set_seed(42)  # the run's seed, set right before it loads the model: the same fresh head
    fresh = load_model(compose_cfg().model, "seq_cls", 2).state_dict()
    # wrapped layers keep the base weight as `.base_layer.` (PEFT) or `.base.` (sparse)
    trained = {k.replace(".base_layer.", ".").replace(".base.", "."): v for k, v in result.model.state_dict().items()}
    unchanged = [k for k in fresh if k in trained and torch.equal(fresh[k], trained[k])]
    changed = [k for k in fresh if k in trained and not torch.equal(fresh[k], trained[k])]
    head = {"classifier.weight", "classifier.bias"}
    assert head <= set(changed)  # every method trains the new head (method.train_head=true)
    if name == "head_only":
        assert set(changed) == head and data["trainable_params"] == HEAD
    if name == "sparse":  # the merged delta: only the attention projections' weights move, and some do
        body = [k for k in changed if k not in head]
        assert body and all(re.search(r"attention\.(self\.(query|key|value)|output\.dense)\.weight$", k)
                            for k in body), body
    if name == "full":
        assert any("intermediate" in k for k in changed)  # the body trains too
    if name in ("lora", "dora"):
        assert not [k for k in changed if not k.startswith("classifier")]  # base weights untouched
    if name == "pissa":  # PiSSA moves the principal components out of the frozen weights, nothing else
        assert all("attention" in k or k.startswith("classifier") for k in changed)
    if name != "full":
        assert any("embeddings" in k for k in unchanged)  # embeddings, layer norms, ... stay as pretrained


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_lora_rank_matches_the_sparse_budget(name, tmp_path):
    run(compose_cfg("debug=fast", "logger=none", FEW_EVAL, f"method={name}", "method.rank=8"), run_dir=tmp_path / "a")
    run(compose_cfg("debug=fast", "logger=none", FEW_EVAL, "method=sparse", "density=lora:8"), run_dir=tmp_path / "b")
    lora = json.loads((tmp_path / "a" / "results.json").read_text())
    sparse = json.loads((tmp_path / "b" / "results.json").read_text())
    assert lora["trainable"]["adapter"] == sparse["trainable"]["sparse"] == LORA_R8
    assert lora["trainable_params"] == sparse["trainable_params"] == LORA_R8 + HEAD
    assert lora["density"] == pytest.approx(sparse["density"])


PER_RANK = 768 * 24  # Σ(in+out) over MiniLM's q, k, v, o


@pytest.mark.parametrize("density, rank", [("lora:4", 4), ("lora:1", 1), (str(5 * PER_RANK + 100), 5),
                                           (str(int(2.5 * PER_RANK)), 2), ("0.01", 2), ("1", 192)])
def test_density_sets_the_lora_rank_in_preflight(density, rank, tmp_path):
    """lora:r is rank r; a count or a fraction, the nearest rank (a tie: the smaller); recorded in the config.
    The 24 targets hold 24·384² = 3,538,944 entries: 1 % is 35,389 entries, rank 1.92."""
    from speft.pipeline import preflight

    for name in ("lora", "pissa", "dora"):
        plan = preflight(compose_cfg(f"method={name}", f"density={density}"), tmp_path)
        assert plan.spec.method.rank == rank and plan.config["method"]["rank"] == rank
        assert plan.entries == rank * PER_RANK


def test_a_budget_lora_cannot_meet_and_a_contradicting_rank_are_refused(tmp_path):
    from speft.pipeline import preflight

    with pytest.raises(ConfigError, match=r"density=9000 is 9,000 entries, fewer than half of LoRA rank 1's 18,432"):
        preflight(compose_cfg("method=lora", "density=9000"), tmp_path)
    with pytest.raises(ConfigError, match=r"method.rank=4 contradicts density=lora:8 \(LoRA rank 8 on these targets\)"):
        preflight(compose_cfg("method=lora", "method.rank=4"), tmp_path)
    with pytest.raises(ConfigError, match=r"lora:<r> with an integer rank r >= 1"):
        preflight(compose_cfg("method=lora", "density=lora:0"), tmp_path)
    assert preflight(compose_cfg("method=lora", "method.rank=8"), tmp_path).spec.method.rank == 8  # agrees


def test_a_lora_density_sweep_trains_each_rank(tmp_path):
    """The study's sweep: -m method=lora density=lora:4,lora:8 trains two ranks (counts 1:2)."""
    import subprocess
    import sys

    from .conftest import ROOT

    cmd = [sys.executable, "run.py", "-m", "method=lora", "density=lora:4,lora:8", "debug=fast", "logger=none",
           "trainer.max_steps=1", "task.max_eval_examples=8", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {json.loads((tmp_path / j / "results.json").read_text())["config"]["density"]:
           json.loads((tmp_path / j / "results.json").read_text())["trainable"]["adapter"] for j in ("0", "1")}
    assert got == {"lora:4": 4 * PER_RANK, "lora:8": 8 * PER_RANK}


def test_frozen_head_is_counted_out_and_left_at_its_initialisation(tmp_path):
    result = run(compose_cfg("debug=fast", "logger=none", FEW_EVAL, "method=lora", "method.train_head=false"),
                 run_dir=tmp_path)
    assert result.results["trainable_params"] == LORA_R8 and result.results["trainable"]["head"] == 0


def test_dynamic_masks_need_the_sparse_method(tmp_path):
    from speft.pipeline import preflight

    with pytest.raises(ConfigError, match="mask=reselect"):
        preflight(compose_cfg("method=lora", "mask=reselect"), tmp_path)
