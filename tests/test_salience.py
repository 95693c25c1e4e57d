"""Salience metrics: recorded properties for every registered metric, brute-force references per metric."""

from __future__ import annotations

import pytest
import torch

from speft import registry
from speft.salience.base import ScoreContext

METRICS = registry.names("metric")


def context(model, targets, batches, seed=0):
    n = sum(b["labels"].shape[0] for b in batches)
    return ScoreContext(model, targets, lambda: iter(batches), n, seed)


def make_metric(name):
    entry = registry.get("metric", name)
    return entry.obj(entry.schema())


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_scores_every_target_and_leaves_the_model_untouched(name, tiny):
    model, targets, batches = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = make_metric(name).score(context(model, targets, batches))
    again = make_metric(name).score(context(model, targets, batches))
    assert set(scores) == set(targets)
    for t, s in scores.items():
        assert s.shape == targets[t].weight.shape and s.dtype == torch.float32
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, again[t], atol=0, rtol=1e-6)  # deterministic
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n]


def full_batch(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_grad_is_abs_of_the_mean_gradient_over_all_examples(tiny):
    """Batches of unequal size (4, 4, 2) must be weighted so the result is the mean over examples."""
    model, targets, batches = tiny
    scores = make_metric("grad").score(context(model, targets, batches))
    model.zero_grad()
    model.eval()
    model(**full_batch(batches)).loss.backward()
    for name, module in targets.items():
        torch.testing.assert_close(scores[name], module.weight.grad.abs(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in METRICS if n not in ("random", "magnitude")])
def test_scoring_keeps_no_gradient_outside_the_targets(name, tiny):
    model, targets, batches = tiny
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g, p=p: seen.append(p))
    make_metric(name).score(context(model, targets, batches))
    target_weights = {id(m.weight) for m in targets.values()}
    assert seen and all(id(p) in target_weights for p in seen)


# ----------------------------------------------------------------------------------------------
# Brute-force references. Tolerances: float32 on the same examples, different summation orders.

TOL = {"atol": 1e-7, "rtol": 1e-5}


def full_gradient(model, targets, batches):
    """Gradient of the mean loss over every example in one padded batch (no hooks, no accumulation)."""
    model.zero_grad()
    model.eval()
    model(**full_batch(batches)).loss.backward()
    grads = {n: m.weight.grad.detach().clone() for n, m in targets.items()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name,formula", [
    ("snip", lambda w, g: (w * g).abs()),
    ("force", lambda w, g: -(w * g)),
    ("taylor_fo", lambda w, g: (w * g) ** 2),
])
def test_gradient_products_match_the_full_batch_gradient(name, formula, tiny):
    model, targets, batches = tiny
    scores = make_metric(name).score(context(model, targets, batches))
    grads = full_gradient(model, targets, batches)
    for n, m in targets.items():
        torch.testing.assert_close(scores[n], formula(m.weight.detach(), grads[n]), **TOL)


def test_force_ranks_the_most_negative_products_first(tiny):
    model, targets, batches = tiny
    scores = make_metric("force").score(context(model, targets, batches))
    grads = full_gradient(model, targets, batches)
    product = targets["q"].weight.detach() * grads["q"]
    assert scores["q"].flatten().argmax() == product.flatten().argmin()


def test_grad_abs_per_batch_is_the_weighted_mean_of_batch_abs_gradients(tiny):
    model, targets, batches = tiny
    entry = registry.get("metric", "grad")
    scores = entry.obj(entry.schema(abs_per_batch=True)).score(context(model, targets, batches))
    n = sum(b["labels"].shape[0] for b in batches)
    expected = {k: torch.zeros_like(m.weight) for k, m in targets.items()}
    for b in batches:
        for k, g in full_gradient(model, targets, [b]).items():
            expected[k] += g.abs() * b["labels"].shape[0] / n
    for k in targets:
        torch.testing.assert_close(scores[k], expected[k], **TOL)


def test_magnitude_and_random(tiny):
    model, targets, batches = tiny
    mag = make_metric("magnitude").score(context(model, targets, batches))
    for n, m in targets.items():
        assert torch.equal(mag[n], m.weight.detach().abs())
    a = make_metric("random").score(context(model, targets, batches, seed=1))
    b = make_metric("random").score(context(model, targets, batches, seed=2))
    assert all(((s >= 0) & (s < 1)).all() for s in a.values())
    assert not torch.equal(a["q"], b["q"])  # seeded: another seed, other scores
    assert not torch.equal(a["q"].flatten(), a["o"].flatten())  # each target its own draw


def unpadded_examples(batches):
    """Every example alone, trimmed to its real tokens."""
    for b in batches:
        for i in range(b["labels"].shape[0]):
            length = int(b["attention_mask"][i].sum())
            yield {k: (v[i : i + 1, :length] if v.dim() == 2 else v[i : i + 1]) for k, v in b.items()}


def fisher_by_loop(model, targets, batches):
    model.eval()
    out = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    examples = list(unpadded_examples(batches))
    for ex in examples:
        model.zero_grad()
        model(**ex).loss.backward()
        for n, m in targets.items():
            out[n] += m.weight.grad.detach() ** 2 / len(examples)
    model.zero_grad(set_to_none=True)
    return out


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg)
    targets = {n: m for n, m in model.named_modules() if n.endswith(("query", "value", "attention.output.dense"))}
    return model, targets


@pytest.mark.parametrize("chunk", [2**24, 16 * 12])  # one bmm per batch, and chunks of one example
def test_fisher_equals_a_per_example_loop_without_padding(chunk, tiny, monkeypatch):
    """Padded batches of unequal size against each example run alone, unpadded (rtol 1e-4)."""
    from speft.salience import _functional

    monkeypatch.setattr(_functional, "CHUNK_ENTRIES", chunk)
    model, targets, batches = tiny
    scores = make_metric("fisher").score(context(model, targets, batches))
    expected = fisher_by_loop(model, targets, batches)
    for n in targets:
        torch.testing.assert_close(scores[n], expected[n], atol=1e-9, rtol=1e-4)


def test_fisher_on_a_transformer_with_padding_counts_only_real_tokens():
    """Attention over padded positions: a tiny BERT, padded batches vs the unpadded loop (rtol 1e-3)."""
    from .conftest import tiny_batches

    model, targets = tiny_bert()
    batches = tiny_batches(n=6, seq=8, batch=3, vocab=50)
    scores = make_metric("fisher").score(context(model, targets, batches))
    expected = fisher_by_loop(model, targets, batches)
    for n in targets:
        scale = expected[n].abs().max()
        torch.testing.assert_close(scores[n], expected[n], atol=1e-5 * float(scale), rtol=1e-3)


def explicit_grasp(model, targets, loss_g, loss_h) -> dict[str, torch.Tensor]:
    """W ⊙ (H g) on the flattened targets, by torch.autograd: ``loss_g(params)`` gives g, ``loss_h(params)`` H,
    each taking ``{"<name>.weight": tensor}`` for torch.func.functional_call."""
    model.eval()
    names = list(targets)
    shapes = [targets[n].weight.shape for n in names]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([targets[n].weight.detach().reshape(-1) for n in names])
    params = lambda theta: {f"{n}.weight": p.view(s) for n, p, s in zip(names, theta.split(sizes), shapes)}  # noqa: E731
    theta = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_g(params(theta)), theta)
    _, hg = torch.autograd.functional.hvp(lambda t: loss_h(params(t)), flat.clone(), g)
    return {n: e.view(s) for n, e, s in zip(names, (flat * hg).split(sizes), shapes)}


def assert_close_to(scores: dict, expected: dict) -> float:
    """Tolerance 1e-4 relative to the largest expected score; returns that score."""
    top = max(float(e.abs().max()) for e in expected.values())
    for n, e in expected.items():
        torch.testing.assert_close(scores[n], e, atol=1e-4 * top, rtol=1e-4)
    return top


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_equals_an_explicit_hessian_vector_product(temperature, tiny):
    """W ⊙ (H g): g from the first half of the examples, H from the second, on the flattened targets,
    with torch.autograd.functional.hvp (tolerance: 1e-4 relative to the largest score)."""
    import torch.nn.functional as F
    from torch.func import functional_call

    model, targets, batches = tiny
    entry = registry.get("metric", "grasp")
    scores = entry.obj(entry.schema(temperature=temperature)).score(context(model, targets, batches))

    data = full_batch(batches)  # 10 examples: the first 5 give g, the last 5 give H
    halves = [{k: v[:5] for k, v in data.items()}, {k: v[5:] for k, v in data.items()}]

    def loss(params, half):
        inputs = {k: v for k, v in half.items() if k != "labels"}
        logits = functional_call(model, params, args=(), kwargs=inputs).logits
        return F.cross_entropy(logits / temperature, half["labels"])

    assert_close_to(scores, explicit_grasp(model, targets, lambda p: loss(p, halves[0]), lambda p: loss(p, halves[1])))


class TinyCausalLM(torch.nn.Module):
    """Embedding -> two linear layers -> LM head; logits (B, T, V)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb = torch.nn.Embedding(20, 8)
        self.q = torch.nn.Linear(8, 12)
        self.o = torch.nn.Linear(12, 8)
        self.head = torch.nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(self.o(torch.tanh(self.q(self.emb(input_ids))))))


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_batch_reduction_is_the_released_per_batch_token_mean(temperature):
    """reduction=batch: g and H of the mean, over each half's batches, of the batch's token-mean loss (the
    released train_step on a causal LM); reduction=example weighs examples equally, which differs when the
    examples have different numbers of labelled tokens."""
    import torch.nn.functional as F
    from torch.func import functional_call

    model = TinyCausalLM()
    targets = {"q": model.q, "o": model.o}
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(4):  # two batches per half, 2 sequences of 6 tokens, different labelled lengths
        ids = torch.randint(0, 20, (2, 6), generator=gen)
        labels = ids.clone()
        labels[0, : 1 + b] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    entry = registry.get("metric", "grasp")
    scores = entry.obj(entry.schema(temperature=temperature, reduction="batch")).score(context(model, targets, batches))
    per_example = entry.obj(entry.schema(temperature=temperature)).score(context(model, targets, batches))

    def loss(params, half):
        total = 0
        for batch in half:
            logits = functional_call(model, params, args=(batch["input_ids"],)).logits / temperature
            total = total + F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
        return total / len(half)

    top = assert_close_to(scores, explicit_grasp(model, targets, lambda p: loss(p, batches[:2]),
                                                 lambda p: loss(p, batches[2:])))
    assert any((per_example[n] - scores[n]).abs().max() > 1e-3 * top for n in targets)


def test_grasp_uses_twice_the_examples_and_splits_them_in_halves():
    from speft.salience._functional import split_examples
    from speft.salience.grasp import Grasp

    assert Grasp.sample_factor == 2
    batches = [{"labels": torch.arange(4)}, {"labels": torch.arange(4, 8)}, {"labels": torch.arange(8, 11)}]
    parts = [(p, b["labels"].tolist()) for p, b in split_examples(batches, 6)]
    assert parts == [(0, [0, 1, 2, 3]), (0, [4, 5]), (1, [6, 7]), (1, [8, 9, 10])]


class ActClassifier(torch.nn.Module):
    """Embedding -> Linear -> GELU module -> Linear -> mean pool -> classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(50, 8)
        self.q = torch.nn.Linear(8, 12)
        self.act = torch.nn.GELU()
        self.o = torch.nn.Linear(12, 8)
        self.classifier = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.o(self.act(self.q(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier((h * m).sum(1) / m.sum(1))
        out = type("Out", (), {})()
        out.logits = logits
        out.loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return out


def bits(model):
    return {k: v.clone().view(torch.int32) if v.dtype == torch.float32 else v.clone()
            for k, v in model.state_dict().items()}


def test_synflow_modules_recipe_matches_a_reference_and_leaves_weights_and_outputs_bit_identical():
    from .conftest import tiny_batches

    model = ActClassifier()
    with torch.no_grad():
        model.q.weight[0, 0] = -0.0  # the sign of a negative zero must survive too
    targets = {"q": model.q, "o": model.o}
    batches = tiny_batches()
    before = bits(model)
    act = model.act
    model.eval()
    out_before = [model(**b).logits for b in batches]
    entry = registry.get("metric", "synflow")
    scores = entry.obj(entry.schema(recipe="modules")).score(context(model, targets, batches))
    after = bits(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.act is act
    assert all(torch.equal(a, model(**b).logits) for a, b in zip(out_before, batches))

    # Reference on a copy: |parameters|, identity activation, all-ones embedding output, R = Σ logits.
    ref = ActClassifier()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
    seq = batches[0]["input_ids"].shape[1]
    h = ref.o(ref.q(torch.ones(1, seq, 8)))
    r = ref.classifier(h.mean(1)).sum()
    gq, go = torch.autograd.grad(r, [ref.q.weight, ref.o.weight])
    torch.testing.assert_close(scores["q"], (ref.q.weight * gq).abs().detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(scores["o"], (ref.o.weight * go).abs().detach(), atol=0, rtol=1e-6)


def test_synflow_on_a_transformer_bypasses_activations_and_restores_everything():
    from speft.salience.synflow import is_activation

    from .conftest import tiny_batches

    model, targets = tiny_bert()
    acts = {n: m for n, m in model.named_modules() if is_activation(m)}
    assert acts  # BERT's GELU and the pooler's tanh
    attn = model.config._attn_implementation
    batches = tiny_batches(n=4, seq=8, batch=2)
    before = bits(model)
    model.eval()
    out_before = [model(**b).logits for b in batches]
    scores = make_metric("synflow").score(context(model, targets, batches))
    assert all(torch.equal(before[k], v) for k, v in bits(model).items())
    assert {n: m for n, m in model.named_modules() if is_activation(m)} == acts
    assert torch.nn.functional.softmax(torch.tensor([0.0, 1.0]), dim=0)[1] > 0.7  # softmax is back
    assert model.config._attn_implementation == attn  # the eager attention of the pass is undone
    assert all(torch.equal(a, model(**b).logits) for a, b in zip(out_before, batches))
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0 for s in scores.values())


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_runs_on_a_tiny_transformer_and_leaves_it_bit_identical(name):
    """Attention, GELU, LayerNorm and padding (GraSP: double backward through attention)."""
    from .conftest import tiny_batches

    model, targets = tiny_bert()
    batches = tiny_batches(n=6, seq=8, batch=3)
    before = bits(model)
    scores = make_metric(name).score(context(model, targets, batches))
    assert set(scores) == set(targets) and all(torch.isfinite(s).all() for s in scores.values())
    assert all(torch.equal(before[k], v) for k, v in bits(model).items())
    assert all(p.grad is None for p in model.parameters())


# The released code's names (model/sparse_peft.py, update_linear_sparse's score_funcs), written out as
# it computes them from the weight w and the mean gradient s.
RELEASED = {
    "gradient": lambda w, s: torch.abs(s),
    "saliency": lambda w, s: torch.abs(w * s),
    "skeletonization": lambda w, s: -w * s,
    "Taylor-FO": lambda w, s: (w * s) ** 2,
}


def test_the_aliases_are_exactly_the_released_codes_names():
    assert registry.aliases("metric") == {"gradient": "grad", "saliency": "snip", "skeletonization": "force",
                                          "Taylor-FO": "taylor_fo", "fisher_info": "fisher"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_released_name_computes_the_released_formula(name, tiny):
    model, targets, batches = tiny
    scores = make_metric(name).score(context(model, targets, batches))
    grads = full_gradient(model, targets, batches)
    for n, m in targets.items():
        torch.testing.assert_close(scores[n], RELEASED[name](m.weight.detach(), grads[n]), **TOL)


def test_fisher_info_is_the_released_mean_squared_per_example_gradient(tiny):
    """compute_fisher_info_scores: Σ over examples of (per-example gradient)², divided by the count."""
    model, targets, batches = tiny
    scores = make_metric("fisher_info").score(context(model, targets, batches))
    data = full_batch(batches)
    expected = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    n_examples = data["labels"].shape[0]
    for i in range(n_examples):
        grads = full_gradient(model, targets, [{k: v[i : i + 1] for k, v in data.items()}])
        for n in targets:
            expected[n] += grads[n] ** 2 / n_examples
    for n in targets:
        torch.testing.assert_close(scores[n], expected[n], atol=1e-7, rtol=1e-4)


def test_an_unknown_metric_name_fails_with_the_choices():
    from speft.registry import ConfigError

    with pytest.raises(ConfigError, match="Available: .*force.*grad"):
        registry.get("metric", "skeleton")


def test_grasp_on_a_regression_head_does_not_temper_the_squared_error():
    """Released compute_grasp_scores tempers CrossEntropyLoss only: on a one-output regression head
    (STS-B) the score is W ⊙ (H g) of the plain mean squared error, written out with hvp."""
    import torch.nn.functional as F
    from torch.func import functional_call

    from .conftest import TinyClassifier, tiny_batches

    model = TinyClassifier(labels=1)
    batches = tiny_batches()
    for i, b in enumerate(batches):
        b["labels"] = torch.linspace(0, 5, b["labels"].shape[0]) + i  # float similarity scores
    targets = {"q": model.q, "o": model.o}
    entry = registry.get("metric", "grasp")
    scores = entry.obj(entry.schema(temperature=200.0)).score(context(model, targets, batches))

    model.eval()
    names = list(targets)
    shapes = [targets[n].weight.shape for n in names]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([targets[n].weight.detach().reshape(-1) for n in names])
    data = full_batch(batches)
    halves = [{k: v[:5] for k, v in data.items()}, {k: v[5:] for k, v in data.items()}]

    def loss(theta, half):
        params = {f"{n}.weight": p.view(s) for n, p, s in zip(names, theta.split(sizes), shapes)}
        inputs = {k: v for k, v in half.items() if k != "labels"}
        logits = functional_call(model, params, args=(), kwargs=inputs).logits
        return F.mse_loss(logits.squeeze(-1), half["labels"])  # no temperature

    theta = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(theta, halves[0]), theta)
    _, hg = torch.autograd.functional.hvp(lambda t: loss(t, halves[1]), flat.clone(), g)
    expected = dict(zip(names, (flat * hg).split(sizes)))
    top = max(float(e.abs().max()) for e in expected.values())
    assert top > 0
    for n, s in zip(names, shapes):
        torch.testing.assert_close(scores[n], expected[n].view(s), atol=1e-4 * top, rtol=1e-4)


class AttnClassifier(torch.nn.Module):
    """One softmax attention head with a GELU, HF-style: takes input_ids or inputs_embeds, classifies
    the last token."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(5)
        self.emb = torch.nn.Embedding(50, dim)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.o = torch.nn.Linear(dim, dim)
        self.classifier = torch.nn.Linear(dim, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        import torch.nn.functional as F

        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        att = F.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1)
        h = F.gelu(self.o(att @ self.v(h)))
        out = type("Out", (), {})()
        out.logits = self.classifier(h[:, -1])
        out.loss = None if labels is None else F.cross_entropy(out.logits, labels)
        return out


def test_synflow_released_recipe_is_identity_softmax_on_one_all_ones_token():
    """Released compute_synflow_scores written out: |parameters|, softmax and GELU as the identity,
    inputs_embeds = ones(1, 1, d), R = Σ logits, score = |W ⊙ ∂R/∂W|."""
    from .conftest import tiny_batches

    model = AttnClassifier()
    targets = {"q": model.q, "k": model.k, "v": model.v, "o": model.o}
    batches = tiny_batches()
    before = bits(model)
    scores = make_metric("synflow").score(context(model, targets, batches))
    assert all(torch.equal(before[k], v) for k, v in bits(model).items())

    ref = AttnClassifier()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
    x = torch.ones(1, 1, 8)
    att = ref.q(x) @ ref.k(x).transpose(1, 2) / 8 ** 0.5  # no softmax
    r = ref.classifier(ref.o(att @ ref.v(x))[:, -1]).sum()  # no GELU
    names = list(targets)
    grads = torch.autograd.grad(r, [getattr(ref, n).weight for n in names])
    for n, g in zip(names, grads):
        torch.testing.assert_close(scores[n], (getattr(ref, n).weight * g).abs().detach(), atol=0, rtol=1e-5)

    # the earlier recipe keeps the softmax (one token: attention weight 1), so q and k get no gradient
    entry = registry.get("metric", "synflow")
    modules = entry.obj(entry.schema(recipe="modules")).score(context(model, targets, batches))
    assert modules["q"].abs().max() == 0 and scores["q"].abs().max() > 0


def test_synflow_recipe_must_be_a_known_name():
    from speft.registry import ConfigError

    with pytest.raises(ConfigError, match="released, modules"):
        registry.get("metric", "synflow").schema(recipe="paper")


def test_synflow_released_recipe_replaces_the_attention_softmax_of_a_transformer():
    """With softmax as the identity, the attention output of one token scales with q·k, so the query
    and key weights get a gradient; with softmax kept (one key: weight 1) they get none."""
    model, targets = tiny_bert()
    from .conftest import tiny_batches

    batches = tiny_batches(n=4, seq=8, batch=2)
    entry = registry.get("metric", "synflow")
    released = entry.obj(entry.schema()).score(context(model, targets, batches))
    query = [n for n in targets if n.endswith("query")]
    total = sum(float(s.sum()) for s in released.values())
    assert query and all(float(released[n].sum()) > 1e-3 * total for n in query)  # kept softmax: ~1e-8 of it


def test_synflow_attention_switch_keeps_or_replaces_the_attention_softmax():
    """attention=eager replaces the attention softmax (eager attention's F.softmax) by the identity;
    attention=model keeps an SDPA model's own attention, whose softmax stays: different scores. On a
    model that already runs eager attention the two are the same pass."""
    from .conftest import tiny_batches

    model, targets = tiny_bert()
    batches = tiny_batches(n=4, seq=8, batch=2)
    entry = registry.get("metric", "synflow")
    score = lambda attention: entry.obj(entry.schema(attention=attention)).score(context(model, targets, batches))
    model.config._attn_implementation = "sdpa"
    eager, own = score("eager"), score("model")
    assert model.config._attn_implementation == "sdpa"
    assert any(not torch.allclose(eager[n], own[n]) for n in targets)
    model.config._attn_implementation = "eager"
    own_eager = score("model")
    assert all(torch.equal(eager[n], own_eager[n]) for n in targets)
