"""The overlap analysis on crafted scores: IoU of selected sets and Spearman correlation per module."""

from __future__ import annotations

import json
import math

import pytest
import torch

from speft.report.overlap import compare, load_input, main, matrices, read_json, spearman
from speft.salience.cache import save


def test_spearman_averages_ties_and_is_one_for_monotone_maps():
    assert spearman(torch.tensor([10.0, 30.0, 20.0, 30.0]), torch.tensor([0.0, 2.5, 1.0, 2.5])) == pytest.approx(1.0)
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


def test_json_output_holds_the_matrices(tmp_path, capsys):
    a, b = crafted()
    c = {"m1": torch.ones(4, 5), "m2": torch.ones(5, 4)}  # constant scores: Spearman undefined (NaN -> null)
    key = lambda name: json.dumps({"metric": {"name": name}})  # noqa: E731
    for name, scores in (("grad", a), ("snip", b), ("magnitude", c)):
        save(tmp_path / f"{name}-0.safetensors", scores, key(name))
    files = [str(tmp_path / f"{n}-0.safetensors") for n in ("grad", "snip", "magnitude")]
    main(["--density", "10", "--selection", "local", "--json", str(tmp_path / "out" / "overlap.json"), *files])
    assert "| grad | snip | 0.3333 | 0.0000 | -1.0000 |" in capsys.readouterr().out  # the table is unchanged
    raw = json.loads((tmp_path / "out" / "overlap.json").read_text())
    assert raw["labels"] == ["grad", "snip", "magnitude"] and raw["k"] == 10 and raw["selection"] == "local"
    assert raw["sources"] == files and len(raw["pairs"]) == 3 and raw["spearman_mean"][0][2] is None
    record = read_json(tmp_path / "out" / "overlap.json")
    iou = record["iou"]
    assert iou[0][1] == iou[1][0] == pytest.approx(5 / 15) and [iou[i][i] for i in range(3)] == [1.0] * 3
    assert record["spearman_min"][0][1] == pytest.approx(-1.0) and math.isnan(record["spearman_mean"][2][0])
    m = matrices(["x", "y"], [{"a": "y", "b": "x", "iou": 0.5, "spearman_mean": 0.1, "spearman_min": 0.0}])
    assert m["iou"] == [[1.0, 0.5], [0.5, 1.0]]
    with pytest.raises(ValueError, match="not an overlap JSON"):
        (tmp_path / "bad.json").write_text("{}")
        read_json(tmp_path / "bad.json")
