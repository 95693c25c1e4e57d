"""The report's uncertainty: t intervals per cell and paired comparisons, against direct computations on a
small made-up result set."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from speft.report import load_records, pivot
from speft.report.__main__ import main
from speft.report.collect import ReportError
from speft.report.stats import bootstrap_interval, paired, sign_flip_p, t_halfwidth
from speft.report.tables import paired_csv, paired_markdown, paired_rows, to_csv

# (method, task, seed) -> accuracy; lora lacks seed 3 on rte, so that pair is not matched
VALUES = {("grad", "glue/sst2", 1): 0.80, ("grad", "glue/sst2", 2): 0.82, ("grad", "glue/sst2", 3): 0.79,
          ("grad", "glue/rte", 1): 0.60, ("grad", "glue/rte", 2): 0.58, ("grad", "glue/rte", 3): 0.61,
          ("lora", "glue/sst2", 1): 0.78, ("lora", "glue/sst2", 2): 0.81, ("lora", "glue/sst2", 3): 0.80,
          ("lora", "glue/rte", 1): 0.55, ("lora", "glue/rte", 2): 0.57}


def write_results(folder, values=VALUES) -> None:
    for i, ((method, task, seed), v) in enumerate(sorted(values.items())):
        run = folder / str(i)
        run.mkdir(parents=True)
        salience = method == "grad"
        config = {"task": {"name": task}, "method": {"name": "sparse" if salience else "lora"},
                  "metric": {"name": "grad"}, "mask": {"name": "static", "selection": "global"},
                  "density": "lora:8", "seed": seed, "model": {"name": "minilm"}}
        run.joinpath("results.json").write_text(json.dumps(
            {"status": "completed", "config": config, "seed": seed, "salience": salience,
             "main_metric": "validation/accuracy", "metrics": {"validation/accuracy": v},
             "best_metrics": {"validation/accuracy": v}}))


@pytest.fixture()
def table(tmp_path):
    write_results(tmp_path)
    return pivot(load_records([tmp_path]), interval="ci95")


def test_t_interval_matches_scipy():
    values = [80.0, 82.0, 79.0]
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=sps.sem(values))
    assert t_halfwidth(values) == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert math.isnan(t_halfwidth([1.0]))


def test_cells_show_the_t_interval_and_say_so(table):
    cell = table.cell("sparse/grad", "glue/sst2")
    assert cell.ci95 == pytest.approx(t_halfwidth([80.0, 82.0, 79.0]))
    assert table.text("sparse/grad", "glue/sst2") == f"{cell.mean:.2f} ± {cell.ci95:.2f} (n=3)"  # n varies
    assert "95 % t interval" in " ".join(table.footer())
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    by = {(r["row"], r["column"]): r for r in rows}
    assert float(by["sparse/grad", "glue/sst2"]["ci95"]) == pytest.approx(cell.ci95)
    lora_rte = table.cell("lora", "glue/rte")  # two seeds: n = 2 is shown
    assert lora_rte.n == 2 and "(n=2)" in table.text("lora", "glue/rte")


def test_sign_flip_p_is_exact_against_brute_force():
    d = np.array([1.5, -0.5, 2.0, 0.25, 1.0])
    observed = abs(d.mean())
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    extreme = sum(abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= observed - 1e-12 for signs in patterns)
    p, exact = sign_flip_p(d)
    assert exact and p == pytest.approx(extreme / len(patterns))
    assert sign_flip_p(np.zeros(4))[0] == 1.0  # no difference at all: every pattern ties


def test_monte_carlo_sign_flip_p_is_close_to_the_exact_one():
    d = np.random.default_rng(3).normal(0.4, 1.0, size=17)  # one pair above the exact limit
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    exact = np.mean(np.abs(signs @ d / len(d)) >= abs(d.mean()) - 1e-12)
    p, is_exact = sign_flip_p(d)
    assert not is_exact and p == pytest.approx(exact, abs=0.01)


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    d = np.array([2.0, -1.0, 0.5, 3.0, 1.0, -0.5, 2.5, 1.5])
    lo, hi = bootstrap_interval(d)
    ref = sps.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                        random_state=1).confidence_interval
    width = ref.high - ref.low
    assert lo == pytest.approx(ref.low, abs=0.05 * width) and hi == pytest.approx(ref.high, abs=0.05 * width)
    assert bootstrap_interval(d) == (lo, hi)  # seeded


def test_paired_rows_match_a_direct_computation(table):
    (lora,) = paired_rows(table, "sparse/grad")
    diffs = [100 * (VALUES["lora", t, s] - VALUES["grad", t, s])
             for t in ("glue/rte", "glue/sst2") for s in (1, 2, 3) if ("lora", t, s) in VALUES]
    assert lora.overall.n == 5 and lora.overall.mean == pytest.approx(statistics.mean(diffs))
    direct = paired(diffs)
    assert (lora.overall.lo, lora.overall.hi, lora.overall.p) == pytest.approx((direct.lo, direct.hi, direct.p))
    assert lora.by_col["glue/rte"] == pytest.approx(statistics.mean(diffs[:2]))
    assert lora.overall.lo <= lora.overall.mean <= lora.overall.hi
    md = paired_markdown(table, "sparse/grad")
    assert "| lora | 5 |" in md and "sign-flip" in md
    rows = list(csv.DictReader(io.StringIO(paired_csv(table, "sparse/grad"))))
    assert [r["column"] for r in rows] == ["all", "glue/rte", "glue/sst2"]
    assert float(rows[0]["p_sign_flip"]) == pytest.approx(direct.p) and rows[1]["pairs"] == "2"
    with pytest.raises(ReportError, match="not a row; rows: sparse/grad, lora"):
        paired_rows(table, "grad")


def test_cli_writes_the_paired_outputs(tmp_path, capsys):
    write_results(tmp_path / "runs")
    main([str(tmp_path / "runs"), "--interval", "ci95", "--paired", "sparse/grad", "--out", str(tmp_path / "t")])
    assert "Paired differences from sparse/grad" in (tmp_path / "t.md").read_text()
    assert "sign-flip" in (tmp_path / "t.tex").read_text()
    assert (tmp_path / "t_paired.csv").read_text().startswith("row,reference,column,pairs")


def test_debug_runs_are_left_out_unless_asked_for_and_then_marked(tmp_path):
    write_results(tmp_path)
    debug = tmp_path / "debug"
    debug.mkdir()
    record = json.loads((tmp_path / "0" / "results.json").read_text())
    record["config"]["debug_run"] = True
    record["metrics"]["validation/accuracy"] = 0.53125
    (debug / "results.json").write_text(json.dumps(record))
    df = load_records([tmp_path])
    table = pivot(df)
    assert not any("debug" in r for r in table.rows) and "Left out: 1 debug runs" in " ".join(table.footer())
    marked = pivot(df, include_debug=True)
    assert any(r.endswith(" (debug)") for r in marked.rows)
    from speft.config import validate

    from .conftest import compose_cfg

    assert validate(compose_cfg("debug=fast")).raw.debug_run is True and compose_cfg().debug_run is False
