"""speft.report on the committed results_small runs: the pivot against a hand computation, missing and
failed cells, the three output formats, CLI errors, a fake W&B API, the figures, and one real sweep."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys

import pytest

from speft.report import figures, load_records, pivot, to_csv, to_latex, to_markdown
from speft.report.__main__ import main
from speft.report.collect import ReportError, normalise
from speft.report.efficiency import bench_table, load_bench, markdown, run_costs

from .conftest import FEW_EVAL, ROOT

FIXTURE = ROOT / "tests" / "data" / "results_small"
BENCH = ROOT / "experiments" / "efficiency" / "bench_smollm2_cpu.jsonl"
METRIC_TABLE = ["method.name=sparse", "mask.name=static", "mask.selection=global", "budget=lora:8"]


@pytest.fixture(scope="module")
def df():
    return load_records([FIXTURE])


def fixture_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURE.rglob("results.json"))]


def hand_values(task: str, metric: str, key: str = "metrics") -> list[float]:
    """Main-metric values (×100) of the static, global, lora:8 sparse runs, straight from the files."""
    out = []
    for r in fixture_results():
        c = r["config"]
        if (r["status"] == "completed" and c["method"]["name"] == "sparse" and c["task"]["name"] == task
                and c["metric"]["name"] == metric and c["mask"]["name"] == "static"
                and c["mask"]["selection"] == "global" and c["density"] == "lora:8"):
            out.append(100 * r[key]["validation/accuracy"])
    return out


def test_fixture_is_small_and_shaped_as_documented():
    results = fixture_results()
    assert len(results) == 20 and sum(r["status"] == "failed" for r in results) == 2
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*")) < 1_000_000
    assert not list(FIXTURE.rglob(".hydra")) and not list(FIXTURE.rglob("*.safetensors"))
    assert json.loads((FIXTURE / "overlap.json").read_text())["labels"] == ["grad", "snip", "magnitude", "fisher"]


def test_pivot_matches_a_hand_computation(df):
    table = pivot(df, rows=["metric.name"], filters=METRIC_TABLE)
    assert table.rows == ["grad", "snip"] and table.cols == ["glue/rte", "glue/sst2"]
    for metric in ("grad", "snip"):
        for task in ("glue/rte", "glue/sst2"):
            values = hand_values(task, metric)
            assert len(values) == 2
            cell = table.cell(metric, task)
            assert cell.mean == pytest.approx(statistics.mean(values))
            assert cell.std == pytest.approx(statistics.stdev(values))
            assert sorted(cell.seeds) == [1, 2]
    # the failed seed-3 run of grad on RTE is counted, not dropped
    assert table.cell("grad", "glue/rte").failed == 1
    assert table.text("grad", "glue/rte").endswith("(1 failed)")
    m, s = statistics.mean(hand_values("glue/sst2", "snip")), statistics.stdev(hand_values("glue/sst2", "snip"))
    assert table.text("snip", "glue/sst2") == f"{m:.2f} ± {s:.2f}"
    # Average: the mean of the row's cell means; best-epoch values come from best_metrics
    expected = statistics.mean([statistics.mean(hand_values(t, "snip")) for t in ("glue/rte", "glue/sst2")])
    assert table.averages()["snip"] == pytest.approx(expected)
    best = pivot(df, rows=["metric.name"], filters=METRIC_TABLE, value="best")
    assert best.cell("grad", "glue/sst2").mean == pytest.approx(
        statistics.mean(hand_values("glue/sst2", "grad", "best_metrics")))
    unscaled = pivot(df, rows=["metric.name"], filters=METRIC_TABLE, scale=1)
    assert unscaled.cell("grad", "glue/sst2").mean == pytest.approx(table.cell("grad", "glue/sst2").mean / 100)
    assert unscaled.digits == 4


def test_missing_and_failed_cells_and_the_footer(df):
    table = pivot(df)  # default rows: method, metric and the factors that vary (mask, selection, budget)
    assert table.row_keys == ["method.name", "metric.name", "mask.name", "mask.selection", "budget"]
    assert table.rows[-2:] == ["lora/lora:2", "lora/lora:8"]  # salience rows first, LoRA without its metric
    assert table.text("lora/lora:8", "glue/rte") == "failed (1/1)"
    assert table.text("lora/lora:2", "glue/rte") == "—"
    assert table.text("sparse/grad/reselect/local/lora:8", "glue/rte") == "—"
    assert table.average_text("lora/lora:8") == "—"  # a column without a value: no average
    md = to_markdown(table)
    assert "| failed (1/1) |" in md and "| — |" in md
    assert "Failed runs (2):" in md and md.count("DataError: glue/rte: the train split is missing") == 2
    assert "n=1" in md  # cells with one and two seeds: the count is shown
    # no silent averaging: a row that ignores the mask schedule is flagged
    mixed = pivot(df, rows=["metric.name"], filters=["method.name=sparse", "budget=lora:8"])
    assert any("differ in mask.name, mask.selection" in n for n in mixed.notes)


def test_best_entries_are_marked_in_every_format(df, tmp_path):
    table = pivot(df, rows=["metric.name"], filters=METRIC_TABLE)
    best = table.best()
    winner = next(iter(best["glue/sst2"]))
    assert table.cell(winner, "glue/sst2").mean == max(table.cell(r, "glue/sst2").mean for r in table.rows)
    assert f"**{table.text(winner, 'glue/sst2')}**" in to_markdown(table)
    tex = to_latex(table)
    assert tex.startswith(r"\begin{tabular}{lrrr}") and r"\textbf{" in tex and r"$\pm$" in tex and "\\bottomrule" in tex
    lines = list(csv.DictReader(io.StringIO(to_csv(table))))
    row = next(x for x in lines if x["row"] == winner and x["column"] == "glue/sst2")
    assert row["best"] == "1" and float(row["mean"]) == pytest.approx(table.cell(winner, "glue/sst2").mean)
    assert row["metric.name"] == winner and row["n"] == "2" and row["metric"] == "validation/accuracy"
    assert {x["column"] for x in lines} == {"glue/rte", "glue/sst2", "Average"}


def test_cli_writes_markdown_latex_and_csv(tmp_path, capsys):
    main([str(FIXTURE), "--rows", "metric.name", *sum((["--filter", f] for f in METRIC_TABLE), []),
          "--out", str(tmp_path / "out" / "table")])
    out = capsys.readouterr().out
    for suffix in (".md", ".tex", ".csv"):
        assert (tmp_path / "out" / f"table{suffix}").stat().st_size > 100
    assert (tmp_path / "out" / "table.md").read_text() == out.rstrip("\n") + "\n"
    assert "| metric.name | glue/rte (accuracy) | glue/sst2 (accuracy) | Average |" in out


def test_filters_and_a_metric_override(df):
    assert len(pivot(df, filters=["task.name!=glue/rte"]).cols) == 1
    assert pivot(df, filters=["seed=1,2", "task.name=glue/sst2"]).failures == []
    assert normalise("0.01") == normalise(0.01) and normalise("1") == normalise(1) and normalise("True") == "true"
    table = pivot(df, rows=["metric.name"], filters=METRIC_TABLE, metric="accuracy")  # a bare name: its split
    assert table.cell("grad", "glue/sst2").mean == pytest.approx(statistics.mean(hand_values("glue/sst2", "grad")))
    absent = pivot(df, rows=["metric.name"], filters=METRIC_TABLE, metric="validation/f1")
    assert absent.text("grad", "glue/sst2") == "no value (2/2)"
    assert any("Completed without a value for validation/f1" in n for n in absent.notes)


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such file or folder"),
    (["{empty}"], "no results.json under this folder"),
    (["{fixture}", "--rows", "metric.nme"], "unknown key 'metric.nme'. Did you mean metric.name"),
    (["{fixture}", "--cols", "bogus"], "Available: "),
    (["{fixture}", "--filter", "task.name"], "write key=value"),
    (["{fixture}", "--filter", "task.name=glue/cola"], "no runs left after the filters"),
])
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    subs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "fixture": FIXTURE}
    with pytest.raises(SystemExit) as exc:
        main([a.format(**subs) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "Available" in message:
        assert "task.name" in err and "trainable_fraction" in err


def test_cli_lists_keys(capsys):
    main([str(FIXTURE), "--keys"])
    keys = capsys.readouterr().out.split()
    assert {"task.name", "metric.name", "mask.selection", "budget", "seed", "timings.total_s"} <= set(keys)


class FakeRun:
    def __init__(self, id, config, summary, state="finished"):
        self.id, self.config, self.summary, self.state = id, config, summary, state


MAIN = {"main_metric": "validation/accuracy", "num_score_examples": 32}  # what speft.loggers.wandb logs


class FakeApi:
    """The part of wandb.Api the report uses: runs(path) -> runs with config, summary, state and id."""

    def __init__(self, *args, **kwargs):
        pass

    def runs(self, path):
        assert path == "team/speft"
        cfg = lambda metric, seed, task="glue/sst2": {  # noqa: E731
            "task": {"name": task}, "method": {"name": "sparse"}, "metric": {"name": metric},
            "mask": {"name": "static", "selection": "global"}, "density": "lora:8", "seed": seed,
            "_wandb": {"cli_version": "0.19"}}
        return [
            FakeRun("a", cfg("grad", 1), {"validation/accuracy": 0.80, "status": "completed", "density": 0.04,
                                          "timings/total_s": 10.0, "train/loss": 0.3, **MAIN}),
            FakeRun("b", cfg("grad", 2), {"validation/accuracy": 0.90, "status": "completed", **MAIN}),
            FakeRun("c", {"task.name": "glue/sst2", "method.name": "sparse", "metric.name": "snip",  # flat keys
                          "mask.name": "static", "mask.selection": "global", "density": "lora:8", "seed": 1},
                    {"validation/accuracy": 0.70, **MAIN}),
            FakeRun("d", cfg("snip", 2), {}, state="crashed"),
        ]


def test_wandb_runs_are_read_like_results_json(monkeypatch, capsys):
    import wandb

    df = load_records(["wandb:team/speft"], api=FakeApi())
    assert list(df["status"]) == ["completed", "completed", "completed", "failed"]
    assert df["run"].iloc[0] == "wandb:team/speft/a" and df["timings.total_s"].iloc[0] == 10.0
    table = pivot(df, rows=["metric.name"])
    assert table.cell("grad", "glue/sst2").mean == pytest.approx(85.0)
    assert table.cell("grad", "glue/sst2").std == pytest.approx(statistics.stdev([80.0, 90.0]))
    assert table.text("snip", "glue/sst2") == "70.00 (n=1, 1 failed)"
    assert "W&B run state 'crashed'" in to_markdown(table)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    main(["wandb:team/speft", "--rows", "metric.name"])
    assert "| grad | **85.00 ± 7.07 (n=2)** | **85.00** |" in capsys.readouterr().out


def test_parse_module_names():
    assert figures.parse_module("bert.encoder.layer.3.attention.self.query") == (3, "query")
    assert figures.parse_module("bert.encoder.layer.3.attention.output.dense") == (3, "attention.output")
    assert figures.parse_module("bert.encoder.layer.11.output.dense") == (11, "output")
    assert figures.parse_module("model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert figures.parse_module("model.layers.0.mlp.down_proj") == (0, "down_proj")
    assert figures.parse_module("model.decoder.layers.2.fc1") == (2, "fc1")
    assert figures.parse_module("classifier") == (None, "classifier")
    table = figures.module_density([{"model.layers.1.self_attn.q_proj": {"selected": 1, "total": 4},
                                     "model.layers.0.self_attn.q_proj": {"selected": 2, "total": 4},
                                     "model.layers.0.mlp.up_proj": {"selected": 0, "total": 4}}])
    assert list(table.index) == [0, 1] and list(table.columns) == ["q_proj", "up_proj"]
    assert table.loc[0, "q_proj"] == 0.5 and table.loc[1, "q_proj"] == 0.25


def nonempty(paths):
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_figures_are_written_as_png_and_pdf(df, tmp_path):
    written = figures.write_figures(df, tmp_path, overlap=FIXTURE / "overlap.json")
    for name in ("density_sweep", "masks", "masks_by_metric", "mask_density", "overlap"):
        assert not isinstance(written[name], str), f"{name}: {written[name]}"
        nonempty(written[name])
    # without the JSON, the score files of the fixture's runs are gone: skipped with the reason, no crash
    skipped = figures.write_figures(df, tmp_path / "b")
    assert "no completed run whose score file" in skipped["overlap"]
    fig = figures.mask_heatmap(df, by="metric.name", which="mask_final_modules", filters=["mask.name=reselect"])
    nonempty(figures.save(fig, tmp_path / "final_masks"))
    nonempty(figures.save(figures.efficiency_bars(load_bench(BENCH)), tmp_path / "bench"))


def test_overlap_figure_from_the_runs_score_files(tmp_path):
    import torch

    from speft.salience.cache import save

    base = torch.arange(20, dtype=torch.float32)
    scores = {"grad": {"m1": base.view(4, 5), "m2": (base + 100).view(5, 4)},
              "snip": {"m1": base.flip(0).view(4, 5), "m2": (base + 100).view(5, 4)}}
    for metric, s in scores.items():
        save(tmp_path / f"{metric}.safetensors", s, json.dumps({"metric": {"name": metric}}))
        run = tmp_path / "runs" / metric
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "status": "completed", "config": {"task": {"name": "glue/sst2"}, "method": {"name": "sparse"},
                                              "metric": {"name": metric}, "density": 10, "seed": 1},
            "metrics": {}, "scoring": {"path": str(tmp_path / f"{metric}.safetensors")}}))
    record = figures.overlap_from_records(load_records([tmp_path / "runs"]), selection="local")
    assert record["labels"] == ["grad", "snip"] and record["iou"][0][1] == pytest.approx(5 / 15)
    nonempty(figures.save(figures.overlap_heatmap(record), tmp_path / "overlap"))


def test_cli_figures(tmp_path, capsys):
    main([str(FIXTURE), "--figures", str(tmp_path)])  # finds <FIXTURE>/overlap.json
    assert {p.name for p in tmp_path.iterdir()} >= {"density_sweep.png", "masks.pdf", "mask_density.png",
                                                    "overlap.pdf"}
    assert "overlap:" in capsys.readouterr().err


def test_efficiency_tables(df):
    bench = bench_table(load_bench(BENCH))
    recorded = load_bench(BENCH).set_index("method")
    for _, row in bench.iterrows():
        assert row["step_vs_lora"] == pytest.approx(recorded.loc[row["method"], "step_vs_lora"], abs=1e-3)
    assert "| sparse |" in markdown(bench)
    costs = run_costs(df, rows=["method.name", "budget"], filters=["task.name=glue/sst2"], reference="lora/lora:8")
    lora = costs[costs["row"] == "lora/lora:8"].iloc[0]
    assert lora["runs"] == 1 and lora["total_vs_lora"] == pytest.approx(1.0)
    assert (costs["peak_rss_mb"] > 0).all() and "scoring_s" in costs
    assert "total_vs_lora" not in run_costs(df, rows=["method.name", "budget"])  # two LoRA rows: no default
    with pytest.raises(ReportError, match="no such benchmark file"):
        load_bench(FIXTURE / "nope.jsonl")


def test_a_real_sweep_gives_four_cells_per_task(tmp_path):
    """python run.py -m ... metric=grad,snip mask=static,reselect: four completed runs, four cells."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SPEFT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "run.py", "-m", "debug=fast", "logger=none", "metric=grad,snip", "mask=static,reselect",
           "method.save_adapter=false", "trainer.max_steps=2", FEW_EVAL,  # seconds per run
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")]
    assert len(results) == 4 and all(r["status"] == "completed" for r in results)
    with pytest.raises(ReportError, match="4 debug runs left out: --include-debug shows them"):
        pivot(load_records([tmp_path / "sweep"]))  # debug=fast runs are left out unless asked for
    table = pivot(load_records([tmp_path / "sweep"]), include_debug=True)
    assert table.row_keys == ["method.name", "metric.name", "mask.name"]
    for col in table.cols:
        assert sum(table.cell(r, col).n == 1 for r in table.rows) == 4
    assert table.rows == [f"{r} (debug)" for r in ("sparse/grad/reselect", "sparse/grad/static",
                                                   "sparse/snip/reselect", "sparse/snip/static")]
    assert not table.failures and not table.notes


def test_the_report_imports_no_model_code():
    code = ("import sys, speft.report, speft.report.__main__; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'speft.components') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_interrupted_run_counts_as_not_finished_not_as_failed(tmp_path):
    import shutil

    shutil.copytree(FIXTURE, tmp_path / "runs")
    path = next(p for p in sorted((tmp_path / "runs").rglob("results.json"))
                if json.loads(p.read_text())["status"] == "completed")
    data = json.loads(path.read_text())
    data["status"] = "interrupted"  # a stop signal: checkpoint written, the run resumes later
    path.write_text(json.dumps(data))
    table, base = pivot(load_records([tmp_path / "runs"])), pivot(load_records([FIXTURE]))
    assert len(table.failures) == len(base.failures)  # the same failed runs (their folders differ)
    assert not any(str(path.parent) in f for f in table.failures)
    assert any(n.startswith("Not finished (1)") for n in table.notes)
