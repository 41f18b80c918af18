"""``mdtzoo eval SAMPLES.npz --ref REF.npz``: the ADM suite (IS, FID, sFID, precision, recall).

Prints the numbers as ADM's evaluator does and writes them, with provenance, to
``<out or the samples' folder>/<samples>_eval_<ref>.json`` atomically; an existing result is
never overwritten without ``--force``. Inputs, the result path and the weights file are checked
before anything is computed.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from mdtzoo.metrics.inception import RESIZE_MODES

    p = sub.add_parser("eval", help="IS / FID / sFID / precision / recall of a samples .npz (ADM suite)")
    p.add_argument("samples", help="samples .npz with arr_0: uint8 (N, H, W, 3); optional arr_1 labels")
    p.add_argument("--ref", required=True, help="reference .npz: ADM's reference batch or one from make_reference")
    p.add_argument("--out", default=None, help="folder for the result JSON (default: next to the samples)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--weights", default=None, help="Inception weights file or folder (default: see docs/evaluation.md)")
    p.add_argument(
        "--resize", choices=RESIZE_MODES, default="tf1", help="299px resize: the TF graph's (default) or pytorch-fid's"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing result file")
    p.set_defaults(fn=run)


def run(args) -> int:
    from mdtzoo import evaluate

    out = evaluate.results_path(args.samples, args.ref, args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; expected a folder")
    results = evaluate.evaluate_npz(
        args.samples, args.ref, weights=args.weights, device=args.device, resize=args.resize, batch_size=args.batch_size
    )
    print(evaluate.format_results(results))
    try:
        evaluate.write_results(results, out, force=args.force)
    except FileExistsError as e:  # appeared while we computed
        raise ValueError(str(e)) from None
    print(f"wrote {out}")
    return 0
