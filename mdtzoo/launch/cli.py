"""The ``mdtzoo`` command line: compose, train, sample, evaluate, sweep and tabulate.

Every subcommand validates its inputs and exits with a one-paragraph message (exit
code 2) on a user error, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import mdtzoo
from mdtzoo import config
from mdtzoo.registry import FAMILIES, UnknownComponentError, family


def _list(args) -> int:
    families = [family(args.family)] if args.family else list(FAMILIES.values())
    if args.markdown:
        print(component_table(families))
        return 0
    for reg in families:
        print(f"{reg.family}  ({len(reg)})")
        rows = reg.describe() or [(f"{reg.family}.*", "(none registered yet)")]
        width = max(len(n) for n, _ in rows)
        for name, doc in rows:
            print(f"  {name:<{width}}  {doc}")
    return 0


def component_table(families=None) -> str:
    """A Markdown table of every registered component (README's component table)."""
    families = list(FAMILIES.values()) if families is None else families
    lines = ["| family | component | what it is |", "|---|---|---|"]
    for reg in families:
        for name, doc in reg.describe():
            lines.append(f"| {reg.family} | `{name}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def _build(args) -> int:
    import torch

    from mdtzoo.models import count_parameters

    if len(args.config) == 1 and Path(args.config[0]).is_dir():
        return _build_each(Path(args.config[0]), args)
    resolved = config.parse(args.config, args.gin)
    start = time.perf_counter()
    # A dry run builds on the meta device: every shape and option is checked, no memory is used.
    with torch.device("meta") if args.dry_run else torch.device("cpu"):
        model = config.call_root(config.build)
    built = time.perf_counter() - start
    if args.dry_run:
        print("# Resolved gin config")
        print(resolved.rstrip() or "# (empty)")
        print()
    n_all, n_inf = count_parameters(model), count_parameters(model, inference=True)
    print(f"parameters: {n_all:,} ({n_all / 1e6:.3f}M); inference path: {n_inf:,} ({n_inf / 1e6:.3f}M)")
    print(f"architecture: {model.summary()}")
    if not args.dry_run:
        b = 2
        x = torch.randn(b, model.in_channels, model.input_size, model.input_size)
        t, y = torch.randint(0, 1000, (b,)), torch.randint(0, model.num_classes, (b,))
        with torch.no_grad():
            out = model(x, t, y)
        print(f"forward check: {tuple(x.shape)} -> {tuple(out.shape)} (built in {built:.1f}s)")
    return 0


def _build_each(folder: Path, args) -> int:
    """Build every model file in a folder (not recursive), one line each, on the meta device."""
    import torch

    from mdtzoo.models import count_parameters
    from mdtzoo.models.presets import PUBLISHED

    files = sorted(p for p in folder.glob("*.gin") if "build.model" in p.read_text())
    if not files:
        raise config.ConfigError(f"no gin file in {folder} sets build.model")
    print(f"{'config':<12} {'parameters':>13} {'inference':>13} {'published':>10}  blocks (enc+dec) x width, tokens")
    for path in files:
        config.parse([path], args.gin)
        with torch.device("meta"):
            model = config.call_root(config.build)
        n_all, n_inf = count_parameters(model), count_parameters(model, inference=True)
        published = PUBLISHED.get(path.stem)
        check = "-" if published is None else f"{published / 1e6:.3f}M " + ("ok" if round(n_all, -3) == round(published, -3) else "DIFFERS")
        arch = f"{model.num_encoder_blocks}+{model.decode_layer} x {model.hidden_size}, {model.grid[0]}x{model.grid[1]}"
        print(f"{path.stem:<12} {n_all:>13,} {n_inf:>13,} {check:>10}  {arch}")
    print(f"built {len(files)} models from {folder}")
    return 0


# One module per subcommand beyond list/build; each defines add_parser(subparsers),
# whose parser sets ``fn`` to a function(args) -> exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "mdtzoo.demo",
    "mdtzoo.launch.train_cmd",
    "mdtzoo.launch.sample_cmd",
    "mdtzoo.launch.extract_cmd",
    "mdtzoo.launch.eval_cmd",
    "mdtzoo.launch.sweep_cmd",
    "mdtzoo.launch.table_cmd",
    "mdtzoo.launch.bench_cmd",
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdtzoo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mdtzoo {mdtzoo.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered components with their one-line docs")
    p.add_argument("family", nargs="?", help=f"one of: {', '.join(FAMILIES)}")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (README)")
    p.set_defaults(fn=_list)

    p = sub.add_parser("build", help="resolve a gin config and build its model")
    p.add_argument("config", nargs="+", help="gin file(s), later ones win; or one folder: build each model file in it")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING", help="extra gin binding, e.g. masking.random.ratio=0.5")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config; build on the meta device")
    p.set_defaults(fn=_build)

    # Subcommands that live with their part of the library: each module has add_parser(sub).
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (config.ConfigError, UnknownComponentError, TypeError, ValueError, OSError) as e:
        if os.environ.get("MDTZOO_DEBUG"):
            raise
        # gin appends "In call to configurable 'x' (<function x at 0x...>)" lines: noise for a user.
        message = "\n".join(line for line in str(e).splitlines()
                            if not line.strip().startswith("In call to configurable"))
        print(f"mdtzoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
