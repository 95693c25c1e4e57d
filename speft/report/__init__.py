"""Tables and figures from saved runs: ``python -m speft.report <dirs | wandb:entity/project>``.

    df = load_records(["experiments/mini_study/runs"])        # one row per run (results.json or W&B)
    table = pivot(df, rows=["metric.name"], filters=["mask.name=static"])
    print(to_markdown(table))                                 # also to_latex, to_csv, table.to_frame()
    figures.density_sweep(df)                                 # matplotlib Figures; figures.save(fig, stem)

See :mod:`speft.report.collect` (the records and their keys), :mod:`speft.report.tables` (the pivot),
:mod:`speft.report.figures` and :mod:`speft.report.efficiency` (benchmark and recorded costs).
"""

from speft.report import figures
from speft.report.collect import ReportError, apply_filters, available_keys, load_records
from speft.report.efficiency import bench_table, load_bench, markdown, run_costs
from speft.report.tables import Table, pivot, to_csv, to_latex, to_markdown

__all__ = ["ReportError", "Table", "apply_filters", "available_keys", "bench_table", "figures", "load_bench",
           "load_records", "markdown", "pivot", "run_costs", "to_csv", "to_latex", "to_markdown"]
