"""``python -m speft.report``: the study's table (and figures) from runs' results.json files or W&B.

    python -m speft.report experiments/mini_study/runs --filter mask.name=static --rows metric.name
    python -m speft.report runs/ --value best --out tables/glue --figures figures/
    python -m speft.report wandb:my-team/speft --cols task.name --scale 100
    python -m speft.report runs/ --interval ci95 --paired sparse/grad --out tables/a

Prints the Markdown table; --out PREFIX writes PREFIX.md, PREFIX.tex and PREFIX.csv; --figures DIR
writes every figure the runs support (PNG and PDF). --keys lists the keys usable in --rows, --cols
and --filter. --interval ci95 shows each cell's 95 % t interval instead of its std; --paired ROW adds
every other row's paired difference from ROW (matched task and seed: mean, bootstrap interval,
sign-flip p-value) to the Markdown and LaTeX outputs and as PREFIX_paired.csv. Filters on metric.*
and mask.* keys keep the runs of methods without a salience mask (LoRA, full), whose metric and mask
settings are unused: add --filter method.name=sparse to drop them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speft.report.collect import ReportError, available_keys, load_records
from speft.report.tables import (
    DEFAULT_COLS,
    FACTORS,
    INTERVALS,
    paired_csv,
    paired_latex,
    paired_markdown,
    pivot,
    to_csv,
    to_latex,
    to_markdown,
)

PROG = "python -m speft.report"


def comma_list(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The study's table (and figures) from runs' results.json "
                                "files or a W&B project.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("sources", nargs="+", metavar="DIR|wandb:ENTITY/PROJECT",
                   help="folders searched recursively for results.json, or a W&B project")
    p.add_argument("--rows", type=comma_list, help="comma list of keys naming a row (default: method.name, "
                   f"metric.name, plus those of {', '.join(FACTORS)} that vary)")
    p.add_argument("--cols", type=comma_list, default=list(DEFAULT_COLS), help="comma list of keys (default task.name)")
    p.add_argument("--value", choices=("final", "best"), default="final",
                   help="final evaluation or the best-epoch one (default final)")
    p.add_argument("--metric", help="report this metric instead of each task's main one (e.g. f1 or validation/f1)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose KEY equals VALUE (a comma list: any of them; KEY!=VALUE: exclude); repeatable")
    p.add_argument("--scale", type=float, default=100.0, help="multiply values (default 100: percent)")
    p.add_argument("--digits", type=int, help="decimals (default 2 in percent, else 4)")
    p.add_argument("--interval", choices=tuple(INTERVALS), default="std",
                   help="what a cell's ± shows: the sample std (default) or the 95 %% t interval of the mean")
    p.add_argument("--paired", metavar="ROW", help="add each row's paired difference from ROW (e.g. sparse/grad)")
    p.add_argument("--include-debug", action="store_true",
                   help="include debug=fast runs (left out by default), marked '(debug)'")
    p.add_argument("--no-average", dest="average", action="store_false", help="no Average column")
    p.add_argument("--out", type=Path, metavar="PREFIX", help="write PREFIX.md, PREFIX.tex and PREFIX.csv")
    p.add_argument("--figures", type=Path, metavar="DIR", help="write the figures the runs support (PNG, PDF)")
    p.add_argument("--overlap", type=Path, metavar="JSON",
                   help="overlap JSON (python -m speft.report.overlap --json) for the overlap figure (default: "
                   "overlap.json in or next to a source folder; else the runs' score files, if they still exist)")
    p.add_argument("--keys", action="store_true", help="list the available keys and exit")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        df = load_records(args.sources)
        if args.keys:
            print("\n".join(available_keys(df)))
            return
        table = pivot(df, rows=args.rows, cols=args.cols, value=args.value, metric=args.metric, scale=args.scale,
                      filters=args.filter, digits=args.digits, average=args.average, interval=args.interval,
                      include_debug=args.include_debug)
        md, tex, outputs = to_markdown(table), to_latex(table), {}
        if args.paired:
            md += "\n" + paired_markdown(table, args.paired)
            tex += "\n" + paired_latex(table, args.paired)
            outputs["_paired.csv"] = paired_csv(table, args.paired)
        print(md)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            for suffix, text in ((".md", md), (".tex", tex), (".csv", to_csv(table)), *outputs.items()):
                path = args.out.parent / (args.out.name + suffix)
                path.write_text(text)
                print(f"wrote {path}", file=sys.stderr)
        if args.figures:
            import matplotlib

            matplotlib.use("Agg")
            from speft.report.figures import find_overlap, write_figures

            overlap = args.overlap or next(filter(None, map(find_overlap, args.sources)), None)
            written = write_figures(df, args.figures, overlap=overlap, value=args.value, metric=args.metric,
                                    scale=args.scale, rows=args.rows, filters=args.filter,
                                    include_debug=args.include_debug)
            for name, result in written.items():
                print(f"{name}: {result if isinstance(result, str) else ', '.join(map(str, result))}", file=sys.stderr)
    except ReportError as e:
        p.exit(2, f"{PROG}: error: {e}\n")


if __name__ == "__main__":
    main()
