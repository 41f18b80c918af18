"""``mdtzoo table`` (paper tables from run directories) and ``mdtzoo plot curves`` (Fig. 1 analogue).

    mdtzoo table table3 runs/table3 runs/baseline                  # FID etc. beside the paper's
    mdtzoo table table5 runs/relations32 --metric relation_acc --step last --out tables/
    mdtzoo table table3 runs/debug/table3 --metric heldout_mse --step last --debug
    mdtzoo plot curves runs/table1 --metric heldout_mse --x both --gpus 8 --out fig1.png
    mdtzoo table small runs/small --out docs/results/small            # issue 8: every small table
    mdtzoo plot curves runs/small --runs 'mdt_seed*,dit_seed*' --metric relation_acc,relation_score \
        --x steps,gpu_seconds --out docs/results/small/fig1.png
"""

from __future__ import annotations

import argparse


def _substitutions(args) -> dict[str, str]:
    from mdtzoo.tables import DEBUG_SUBSTITUTE

    subs = dict(DEBUG_SUBSTITUTE) if args.debug else {}
    for item in args.substitute:
        ours, _, paper = item.partition("=")
        if not ours or not paper:
            raise ValueError(f"--substitute wants OURS=PAPER model names (e.g. mdt_xs2=mdt_s2); got {item!r}")
        subs[ours.strip()] = paper.strip()
    return subs


def _step(text: str | None):
    if text is None or text == "last":
        return text
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"--step wants a step number or 'last'; got {text!r}") from None


def run_table(args) -> int:
    from mdtzoo.tables import collect, make_table, small, table_markdown, table_spec, write_table

    frame = collect(args.paths, _substitutions(args), upto=args.upto)
    if frame.empty:
        raise ValueError(f"no run directories under {', '.join(args.paths)}")
    if args.table in small.SMALL_TABLES or args.table in small.REPORTS:
        if args.dataset is not None:
            frame = frame[frame["dataset"] == args.dataset]
        text, paths = small.report(args.table, frame, out=args.out, metric=args.metric, step=_step(args.step))
        print(text)
        if paths:
            print("wrote " + "  ".join(str(p) for p in paths))
        return 0
    spec = table_spec(args.table)
    table = make_table(spec, frame, metric=args.metric, step=_step(args.step), dataset=args.dataset)
    print(table_markdown(table))
    if args.out:
        paths = write_table(table, args.out)
        print("wrote " + "  ".join(str(p) for p in paths.values()))
    return 0


def run_curves(args) -> int:
    from mdtzoo.tables import plot_curves

    out = args.out or f"curves_{args.metric.replace(',', '_')}.png"
    fig = plot_curves(args.paths, metric=args.metric, x=args.x, gpus=args.gpus, out=out,
                      substitute=_substitutions(args), runs=args.runs, upto=args.upto)
    lines = len(fig.axes[0].get_lines())
    print(f"wrote {out} ({lines} configuration{'s' if lines != 1 else ''} per panel)")
    return 0


def _common(p) -> None:
    p.add_argument("paths", nargs="+", help="run directories, or folders holding them (searched recursively)")
    p.add_argument("--substitute", action="append", default=[], metavar="OURS=PAPER",
                   help="treat model OURS as the paper's PAPER when matching rows (e.g. mdt_xs2=mdt_s2)")
    p.add_argument("--debug", action="store_true", help="debug runs: --substitute mdt_xs2=mdt_s2 dit_xs2=dit_s2")
    p.add_argument("--upto", type=int, metavar="STEP",
                   help="compare at a common horizon: evaluations after STEP are ignored and every run that "
                        "got to STEP counts as finished (runs stopped at different steps)")


def add_parser(sub) -> None:
    from mdtzoo.tables.papers import TABLES
    from mdtzoo.tables.small import REPORTS, SMALL_TABLES

    p = sub.add_parser("table", help="lay finished runs out like a table of the MDT paper, beside its numbers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=[*TABLES, *SMALL_TABLES, *REPORTS],
                   help="the paper's table, or one of the small reproduction's (issue 8; 'small' = all of them)")
    _common(p)
    p.add_argument("--metric", default=None,
                   help="one metric (default: the paper's columns: FID, or FID/sFID/IS/Prec/Rec; small tables: "
                        "relation_acc, relation_score, heldout_mse); a metric the paper lacks stands beside its FID "
                        "for direction")
    p.add_argument("--step", default=None,
                   help="evaluated step to use for every row, or 'last' (each finished run's last evaluation); "
                        "default: each row's paper step (small tables: last)")
    p.add_argument("--dataset", default=None, help="keep runs of this dataset only (latents, relations, ...)")
    p.add_argument("--out", default="tables", help="folder for CSV / Markdown / LaTeX (default tables/; '' = none)")
    p.set_defaults(fn=run_table)

    p = sub.add_parser("plot", help="plots of runs: `mdtzoo plot curves` (the paper's Fig. 1 analogue)")
    kinds = p.add_subparsers(dest="plot", required=True)
    c = kinds.add_parser("curves", help="a metric vs training steps and GPU hours, MDT vs DiT, mean +- std over seeds")
    _common(c)
    c.add_argument("--metric", default="heldout_mse",
                   help="metric(s) on the y axis, comma-separated: one row of panels each (default heldout_mse; "
                        "fid, relation_acc, relation_score ...)")
    c.add_argument("--x", default="both",
                   help="x axes, comma-separated: steps, gpu_hours, gpu_seconds; both = steps,gpu_hours (default)")
    c.add_argument("--runs", default=None, metavar="PATTERNS",
                   help="plot only runs whose names match these shell patterns, e.g. 'mdt_seed*,dit_seed*'")
    c.add_argument("--gpus", type=int, default=1, help="GPUs per run, for GPU time where the log records no world size")
    c.add_argument("--out", default=None, help="PNG path (default curves_<metric>.png)")
    c.set_defaults(fn=run_curves)
