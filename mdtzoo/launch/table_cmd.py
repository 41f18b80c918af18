"""``mdtzoo table`` (paper tables from run directories) and ``mdtzoo plot curves`` (Fig. 1 analogue).

    mdtzoo table table3 runs/table3 runs/baseline                  # FID etc. beside the paper's
    mdtzoo table table5 runs/relations32 --metric relation_acc --step last --out tables/
    mdtzoo table table3 runs/debug/table3 --metric heldout_mse --step last --debug
    mdtzoo plot curves runs/table1 --metric heldout_mse --x both --gpus 8 --out fig1.png
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
    from mdtzoo.tables import collect, make_table, table_markdown, table_spec, write_table

    spec = table_spec(args.table)
    frame = collect(args.paths, _substitutions(args))
    if frame.empty:
        raise ValueError(f"no run directories under {', '.join(args.paths)}")
    table = make_table(spec, frame, metric=args.metric, step=_step(args.step), dataset=args.dataset)
    print(table_markdown(table))
    if args.out:
        paths = write_table(table, args.out)
        print("wrote " + "  ".join(str(p) for p in paths.values()))
    return 0


def run_curves(args) -> int:
    from mdtzoo.tables import plot_curves

    out = args.out or f"curves_{args.metric}.png"
    fig = plot_curves(args.paths, metric=args.metric, x=args.x, gpus=args.gpus, out=out,
                      substitute=_substitutions(args))
    lines = len(fig.axes[0].get_lines())
    print(f"wrote {out} ({lines} configuration{'s' if lines != 1 else ''} per panel)")
    return 0


def _common(p) -> None:
    p.add_argument("paths", nargs="+", help="run directories, or folders holding them (searched recursively)")
    p.add_argument("--substitute", action="append", default=[], metavar="OURS=PAPER",
                   help="treat model OURS as the paper's PAPER when matching rows (e.g. mdt_xs2=mdt_s2)")
    p.add_argument("--debug", action="store_true", help="debug runs: --substitute mdt_xs2=mdt_s2 dit_xs2=dit_s2")


def add_parser(sub) -> None:
    from mdtzoo.tables.papers import TABLES

    p = sub.add_parser("table", help="lay finished runs out like a table of the MDT paper, beside its numbers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=list(TABLES), help="the paper's table")
    _common(p)
    p.add_argument("--metric", default=None,
                   help="one metric (default: the paper's columns: FID, or FID/sFID/IS/Prec/Rec); a metric the "
                        "paper lacks (relation_acc, heldout_mse) stands beside its FID for direction")
    p.add_argument("--step", default=None,
                   help="evaluated step to use for every row, or 'last' (each finished run's last evaluation); "
                        "default: each row's paper step")
    p.add_argument("--dataset", default=None, help="keep runs of this dataset only (latents, relations, ...)")
    p.add_argument("--out", default="tables", help="folder for CSV / Markdown / LaTeX (default tables/; '' = none)")
    p.set_defaults(fn=run_table)

    p = sub.add_parser("plot", help="plots of runs: `mdtzoo plot curves` (the paper's Fig. 1 analogue)")
    kinds = p.add_subparsers(dest="plot", required=True)
    c = kinds.add_parser("curves", help="a metric vs training steps and GPU hours, MDT vs DiT, mean +- std over seeds")
    _common(c)
    c.add_argument("--metric", default="heldout_mse", help="metric on the y axis (default heldout_mse; fid, relation_acc ...)")
    c.add_argument("--x", default="both", choices=["steps", "gpu_hours", "both"], help="x axis (default both panels)")
    c.add_argument("--gpus", type=int, default=1, help="GPUs per run, for GPU hours (metrics.jsonl has no world size)")
    c.add_argument("--out", default=None, help="PNG path (default curves_<metric>.png)")
    c.set_defaults(fn=run_curves)
