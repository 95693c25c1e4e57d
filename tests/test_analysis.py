"""The overlap analysis on crafted scores: IoU of selected sets and Spearman correlation per module."""

from __future__ import annotations

import json

import pytest
import torch

from speft.analysis.overlap import compare, load_input, main, ranks, spearman
from speft.salience.cache import save


def test_ranks_average_ties_and_spearman_of_monotone_maps():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 30.0])).tolist() == [0.0, 2.5, 1.0, 2.5]
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -x * 3) == pytest.approx(-1.0)
    # ρ of two permutations: 1 - 6 Σd² / (n(n²-1))
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])
    assert spearman(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))


def crafted():
    base = torch.arange(20, dtype=torch.float32)
    a = {"m1": base.view(4, 5), "m2": (base + 100).view(5, 4)}  # m2 holds the 20 largest scores
    b = {"m1": base.flip(0).view(4, 5), "m2": (base + 100).view(5, 4)}  # m1 reversed
    return a, b


def test_compare_reports_iou_and_spearman():
    a, b = crafted()
    k, rows = compare([("a", a), ("b", b)], 0.25, "local")  # 10 entries: the top 5 of each module
    assert k == 10
    (row,) = rows
    # m2: the same 5; m1: {15..19} vs {0..4}: disjoint. IoU = 5 / 15.
    assert row["iou"] == pytest.approx(5 / 15)
    assert row["spearman_mean"] == pytest.approx(0.0) and row["spearman_min"] == pytest.approx(-1.0)
    _, rows = compare([("a", a), ("b", b)], 0.25, "global")  # the 10 largest all lie in m2 for both
    assert rows[0]["iou"] == 1.0


def test_cli_reads_score_files_and_run_folders(tmp_path, capsys):
    a, b = crafted()
    key = lambda name: json.dumps({"metric": {"name": name}})  # noqa: E731
    save(tmp_path / "grad-0.safetensors", a, key("grad"))
    save(tmp_path / "snip-0.safetensors", b, key("snip"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {"metric": {"name": "snip"}},
                                                  "scoring": {"path": str(tmp_path / "snip-0.safetensors")}}))
    assert load_input(run)[0] == "snip"
    main(["--density", "10", "--selection", "local", str(tmp_path / "grad-0.safetensors"), str(run)])
    out = capsys.readouterr().out
    assert "| grad | snip | 0.3333 | 0.0000 | -1.0000 |" in out and "10 entries" in out
