"""``mdtzoo eval SAMPLES.npz --ref REF.npz``: the ADM suite (IS, FID, sFID, precision, recall).
``mdtzoo eval RUN_DIR [--ref REF.npz]``: sample from a run's EMA weights and evaluate it
(held-out loss and, on relations data, oracle relation accuracy; plus the ADM suite with --ref),
recording the step evaluated in ``RUN/eval/step_XXXXXXXX.json`` (see ``mdtzoo.evaluation``).

Prints the numbers as ADM's evaluator does and writes them, with provenance, to
``<out or the samples' folder>/<samples>_eval_<ref>.json`` atomically; an existing result is
never overwritten without ``--force``. Inputs, the result path and the weights file are checked
before anything is computed.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from mdtzoo.metrics.inception import RESIZE_MODES

    p = sub.add_parser("eval", help="evaluate a samples .npz (ADM suite) or a run directory")
    p.add_argument("samples", help="samples .npz with arr_0: uint8 (N, H, W, 3); or a run directory")
    p.add_argument("--ref", default=None, help="reference .npz: ADM's reference batch or one from make_reference")
    p.add_argument("--metrics", default=None, help="run mode: comma-separated registered metrics (mdtzoo list metrics)")
    p.add_argument("--num-samples", type=int, default=None, help="run mode: samples to draw (default 50k with --ref)")
    p.add_argument("--sample-steps", default=None, help="run mode: respaced DDPM steps (default 250 with --ref, else 100)")
    p.add_argument("--guidance", default="none", help="run mode: none | constant | power_cosine")
    p.add_argument("--cfg-scale", type=float, default=None, help="run mode: guidance scale")
    p.add_argument("--vae", default=None, help="run mode, latent runs: VAE directory or 'ema'/'mse' from the HF cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="run mode: evaluate this step's checkpoint (default: the latest)")
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

    if Path(args.samples).is_dir():
        return run_dir_mode(args)
    if args.ref is None:
        raise ValueError("evaluating a samples .npz needs --ref REF.npz")

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


def run_dir_mode(args) -> int:
    import json

    from mdtzoo.evaluation import evaluate_run, result_path

    checkpoint = None
    if args.step is not None:
        from mdtzoo.training.checkpoint import checkpoint_path

        checkpoint = checkpoint_path(Path(args.samples) / "checkpoints", args.step)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"no checkpoint for step {args.step}: {checkpoint} (see train.keep_every)")
    result = evaluate_run(
        args.samples, checkpoint=checkpoint, metrics=args.metrics.split(",") if args.metrics else None, num_samples=args.num_samples,
        sample_steps=args.sample_steps, guidance=args.guidance, cfg_scale=args.cfg_scale, ref=args.ref,
        weights=args.weights, vae=args.vae, seed=args.seed, device=args.device, force=args.force,
    )
    print(json.dumps(result["metrics"], indent=2, sort_keys=True))
    print(f"step {result['step']}: {result_path(args.samples, result['step'], args.guidance, args.cfg_scale)}")
    return 0
