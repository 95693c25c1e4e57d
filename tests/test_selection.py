"""Exact top-k: equal to concatenate-and-sort with the documented tie rule, exactly k entries."""

from __future__ import annotations

import pytest
import torch

from speft.masks.selection import SELECTIONS, local_counts, select_global, select_local


def brute_force_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """Concatenate, stable-sort by (-score, module order, index), take k."""
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    order = sorted(range(len(flat)), key=lambda i: (-flat[i].item(), i))[:k]
    chosen, out, offset = set(order), {}, 0
    for name, s in scores.items():
        out[name] = sorted(i - offset for i in chosen if offset <= i < offset + s.numel())
        offset += s.numel()
    return out


def make_scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(30, 20, generator=g),
        "b": torch.randn(10, 5, generator=g).round(),  # many ties
        "c": torch.tensor([[-0.0, 0.0], [float("inf"), -float("inf")]]),
        "d": torch.full((3, 3), 0.5),  # all tied
    }


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 7, 100, 333, 600, 663])
def test_global_equals_brute_force(seed, k):
    scores = make_scores(seed)
    got = select_global(scores, k)
    assert sum(len(v) for v in got.values()) == k
    assert {n: v.tolist() for n, v in got.items()} == brute_force_global(scores, k)


@pytest.mark.parametrize("k", [1, 24, 250, 663])
def test_local_keeps_each_modules_top_entries(k):
    scores = make_scores(3)
    got = select_local(scores, k)
    counts = local_counts({n: s.numel() for n, s in scores.items()}, k)
    assert sum(len(v) for v in got.values()) == k
    for name, s in scores.items():
        assert len(got[name]) == counts[name]
        assert got[name].tolist() == brute_force_global({name: s}, counts[name])[name]


def test_local_counts_are_proportional_and_exact():
    counts = local_counts({"a": 100, "b": 300, "c": 600}, 10)
    assert counts == {"a": 1, "b": 3, "c": 6}
    counts = local_counts({"a": 1, "b": 1, "c": 1}, 2)
    assert sum(counts.values()) == 2 and max(counts.values()) == 1


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_every_selection_is_exact_sorted_unique_and_deterministic(name):
    g = torch.Generator().manual_seed(0)
    scores = {f"m{i}": torch.rand(16, 8, generator=g).to(torch.bfloat16).float() for i in range(4)}
    a, b = SELECTIONS[name](scores, 77), SELECTIONS[name](scores, 77)
    assert sum(len(v) for v in a.values()) == 77
    for n in scores:
        assert torch.equal(a[n], b[n])
        assert torch.equal(a[n], torch.unique(a[n]))  # sorted, no repeats


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        select_global({"a": torch.tensor([1.0, float("nan")])}, 1)


@pytest.mark.parametrize("k", [1, 50, 333, 663])
def test_chunked_reading_gives_the_same_selection(k, monkeypatch):
    """Modules larger than a chunk are read piecewise (the memory bound for 7B-scale models)."""
    import speft.masks.selection as sel

    scores = make_scores(5)
    expected = brute_force_global(scores, k)
    monkeypatch.setattr(sel, "CHUNK", 7)
    assert {n: v.tolist() for n, v in sel.select_global(scores, k).items()} == expected


def test_the_radix_select_moves_256_counts_to_the_host_per_pass_not_every_chunk(monkeypatch):
    """On a GPU every host copy is a sync: the histogram stays on the scores' device until a pass ends
    (4 passes, whatever the number of chunks), and the NaN check is one transfer for all modules."""
    import speft.masks.selection as sel

    scores = make_scores(5)
    monkeypatch.setattr(sel, "CHUNK", 7)  # many chunks per module
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.numel()) or real_cpu(t, *a, **k))
    sel.kth_largest_key(scores, 50)
    assert copies == [256] * 4
    lists = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: lists.append(t.numel()) or real_tolist(t))
    sel._check(scores, 50)
    assert lists == [len(scores)]


def released_local_topk(scores: dict[str, torch.Tensor], per_module: dict[str, int]) -> dict[str, list[int]]:
    """The released code's local rule written out: each module's own torch.topk of its count."""
    return {n: sorted(torch.topk(s.flatten(), per_module[n]).indices.tolist()) for n, s in scores.items()}


def unequal_scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)  # Gemma-like: q/o wider than k/v (no ties: topk is unambiguous)
    return {"q": torch.randn(12, 8, generator=g), "k": torch.randn(4, 8, generator=g),
            "v": torch.randn(4, 8, generator=g), "o": torch.randn(8, 12, generator=g)}


def test_local_count_budget_gives_every_module_the_same_count():
    """Released rule (model/sparse_peft.py: layer_k = sparse_k / len(layers)) on unequal modules."""
    scores = unequal_scores()
    got = select_local(scores, 40, kind="count")
    assert {n: len(v) for n, v in got.items()} == {"q": 10, "k": 10, "v": 10, "o": 10}
    assert {n: v.tolist() for n, v in got.items()} == released_local_topk(scores, dict.fromkeys(scores, 10))
    uneven = select_local(scores, 42, kind="count")  # 42 = 4 x 10 + 2: the first two modules get one more
    assert [len(v) for v in uneven.values()] == [11, 11, 10, 10]


def test_local_lora_budget_gives_each_module_loras_own_count():
    scores = unequal_scores()
    r = 1
    counts = {n: r * (s.shape[0] + s.shape[1]) for n, s in scores.items()}  # q 20, k 12, v 12, o 20
    got = select_local(scores, sum(counts.values()), kind="lora", rank=r)
    assert {n: v.tolist() for n, v in got.items()} == released_local_topk(scores, counts)


def test_local_fraction_budget_keeps_the_same_density():
    scores = unequal_scores()
    got = select_local(scores, 64, kind="fraction")  # 1/4 of 256 entries
    assert {n: len(v) for n, v in got.items()} == {"q": 24, "k": 8, "v": 8, "o": 24}


def test_local_count_larger_than_a_module_fails_naming_it():
    from speft.registry import ConfigError

    with pytest.raises(ConfigError, match=r"k \(40 > 32\).*mask.selection=global"):
        select_local(unequal_scores(), 160, kind="count")


def test_the_mask_passes_the_budget_form_to_the_local_selection():
    from speft.config import Budget
    from speft.masks.static import StaticMask, StaticMaskConfig

    mask = StaticMask(StaticMaskConfig(selection="local"), Budget.parse(40))
    assert [len(v) for v in mask.select(unequal_scores(), 40).values()] == [10, 10, 10, 10]
    mask = StaticMask(StaticMaskConfig(selection="local"), Budget.parse("lora:1"))
    assert [len(v) for v in mask.select(unequal_scores(), 64).values()] == [20, 12, 12, 20]
