"""Sweep files: a grid over gin bindings -> points (gin files, bindings, run dir), all plain strings.

A sweep is a small TOML file next to the gin files it varies (docs/slurm.md)::

    gin = ["demo/base.gin"]                        # base gin files
    bindings = ["train.steps = 4"]                 # fixed bindings, after the files
    [product]                                      # every combination of these axes
    "masking.random.ratio" = [0.3, 0.5]
    [[zip]]                                        # values that vary together: one axis
    "build.model" = ["@models.mdt_xs2", "@models.dit_xs2"]
    "train.passes" = ["both", "full"]

    sweep = load_sweep("experiments/debug/tiny.sweep")
    sweep.points[0].name        # 'ratio=0.3,model=mdt_xs2,passes=both'
    problems = validate(sweep.points, sweep.evaluation)   # {point: one-line error}; all or nothing

A point's name is built from its varying values only, so it is stable across edits that do
not touch the grid. Gin references (``@models.mdt_xs2``) and gin files name themselves by their
last component (``mdt_xs2``, the file stem), as everywhere else in mdtzoo.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mdtzoo import config as cfg

TOP_LEVEL_KEYS = ("name", "root", "gin", "bindings", "run_name", "product", "zip", "eval")
# [eval]: evaluate_run's keyword arguments (mdtzoo.evaluation), plus enabled = false to skip it.
EVAL_KEYS = ("enabled", "metrics", "num_samples", "sample_steps", "seed", "guidance", "cfg_scale", "ref",
             "weights", "vae")
FILES_KEY = "gin"            # an axis over extra gin files (one file, or a list, per value)
BINDINGS_KEY = "bindings"    # an axis over raw binding strings (e.g. "train.grad_clip = None"), or lists
NAME_KEY = "name"            # in a zip group: the run-name fragment of each value (binds nothing)
SPECIAL_KEYS = (FILES_KEY, BINDINGS_KEY, NAME_KEY)
MAX_NAME = 200               # a run name is one path component (255 bytes on most file systems)


@dataclass(frozen=True)
class Point:
    """One grid point: everything a job needs, as strings (gin is parsed inside the job)."""

    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]     # fixed, then varying, then ``train.run_dir = '...'``
    run_dir: str
    values: tuple[tuple[str, str], ...] = ()   # (axis key, gin value) of the varying axes

    def as_dict(self) -> dict:
        return {"name": self.name, "gin_files": list(self.gin_files), "bindings": list(self.bindings),
                "run_dir": self.run_dir, "values": dict(self.values)}


@dataclass(frozen=True)
class Sweep:
    name: str
    path: str                     # the sweep file ('' when built in Python)
    root: str                     # the folder holding the points' run dirs
    points: tuple[Point, ...]
    evaluation: dict = field(default_factory=dict)   # evaluate_run keyword arguments; {} = no eval


# -- values: TOML -> gin text and name fragments ---------------------------------------------------
def gin_value(value: Any) -> str:
    """A TOML value as gin text: strings are quoted unless they are references (@x) or macros (%X)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value[:1] in ("@", "%") else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(gin_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {gin_value(v)}" for k, v in value.items()) + "}"
    raise cfg.ConfigError(f"cannot express {value!r} ({type(value).__name__}) in gin")


def slug(value: Any) -> str:
    """A value as a run-name fragment: no '/', readable, stable (``@models.mdt_xs2`` -> ``mdt_xs2``)."""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value).replace("e+", "e")
    elif isinstance(value, (list, tuple)):
        text = "_".join(slug(v) for v in value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}{slug(v)}" for k, v in value.items())
    else:
        text = str(value)
        if text[:1] in ("@", "%"):   # a reference or macro: its last component
            text = text[1:].removesuffix("()").rsplit(".", 1)[-1]
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")
    return text or "_"


def _file_slug(value: Any) -> str:
    files = value if isinstance(value, list) else [value]
    return "_".join(slug(Path(f).stem) for f in files)


def _bindings_slug(value: Any) -> str:
    lines = value if isinstance(value, list) else [value]
    parts = []
    for line in lines:
        key, _, expr = str(line).partition("=")
        parts.append(f"{key.strip().rsplit('.', 1)[-1]}={slug(expr.strip().strip(chr(39) + chr(34)))}")
    return ",".join(parts)


# -- loading ---------------------------------------------------------------------------------------
def load_sweep(path: str | os.PathLike, root: str | os.PathLike | None = None, bindings: Sequence[str] = ()) -> Sweep:
    """Read a sweep file; ``root`` defaults to the file's ``root``, else ``runs/<sweep name>`` (both
    relative to the current folder);
    ``bindings`` (``mdtzoo sweep --gin``) follow the file's fixed bindings, before the grid's."""
    path = Path(path)
    if not path.is_file():
        raise cfg.ConfigError(f"sweep file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise cfg.ConfigError(f"{path}: not valid TOML: {e}") from None
    return make_sweep(data, base=path.resolve().parent, name=data.get("name", path.stem), root=root,
                      source=str(path.resolve()), bindings=bindings)


def make_sweep(data: dict, base: str | os.PathLike = ".", name: str = "sweep",
               root: str | os.PathLike | None = None, source: str = "", bindings: Sequence[str] = ()) -> Sweep:
    """Expand a parsed sweep (the TOML's dict) into points; ``base`` resolves relative gin paths."""
    where = source or "sweep"
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise cfg.ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}")
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", str(name)) or name in (".", ".."):
        raise cfg.ConfigError(f"{where}: sweep name {name!r} must be one path component of [A-Za-z0-9._=+-]")
    base = Path(base)
    gin_files = [resolve_gin_file(f, base, where) for f in _strings(data.get("gin", []), "gin", where)]
    fixed = _strings(data.get("bindings", []), "bindings", where) + list(bindings)
    axes = _axes(data, where)
    if root is None:
        root = data.get("root") or Path("runs") / name
    root = Path(root).resolve()
    labels = _labels([k for k, _ in axes_items(axes)])
    template = data.get("run_name")

    points = []
    for combo in itertools.product(*[range(len(axis[0][1])) for axis in axes]):
        chosen = [(key, values[i]) for axis, i in zip(axes, combo) for key, values in axis]
        files, lines_of_point, shown, fragments = list(gin_files), list(fixed), [], {}
        for key, value in chosen:
            if key == FILES_KEY:
                files += [resolve_gin_file(f, base, where) for f in (value if isinstance(value, list) else [value])]
                fragments[key] = _file_slug(value)
                shown.append((key, ", ".join(value) if isinstance(value, list) else value))
            elif key == NAME_KEY:
                fragments[key] = slug(value)
                shown.append((key, value))
            elif key == BINDINGS_KEY:
                lines = value if isinstance(value, list) else [value]
                lines_of_point += [str(line) for line in lines]
                fragments[key] = _bindings_slug(value)
                shown.append((key, "; ".join(map(str, lines))))
            else:
                lines_of_point.append(f"{key} = {gin_value(value)}")
                fragments[key] = f"{labels[key]}={slug(value)}"
                shown.append((key, gin_value(value)))
        for axis in axes:  # a zip group with names: its name stands for its keys
            if any(k == NAME_KEY for k, _ in axis):
                for k, _ in axis:
                    if k != NAME_KEY:
                        fragments.pop(k, None)
        point_name = _render_name(template, fragments, chosen, labels, where) if template else (
            ",".join(f for f in fragments.values() if f) or "run")
        if len(point_name) > MAX_NAME:
            raise cfg.ConfigError(f"{where}: run name {point_name[:60]}... is longer than {MAX_NAME} characters; "
                                  "set run_name = '...' to a shorter template")
        run_dir = str(root / point_name)
        lines_of_point.append(f"train.run_dir = {run_dir!r}")
        points.append(Point(point_name, tuple(files), tuple(lines_of_point), run_dir, tuple(shown)))

    seen: dict[str, int] = {}
    for i, p in enumerate(points):
        if p.name in seen:
            raise cfg.ConfigError(
                f"{where}: points {seen[p.name]} and {i} both get the run name {p.name!r}; "
                "the run_name template must use every varying key")
        seen[p.name] = i
    return Sweep(name, source, str(root), tuple(points), _evaluation(data.get("eval", {}), where))


def resolve_gin_file(name: str, base: Path, where: str = "sweep") -> str:
    """A gin path as an absolute path: relative to the sweep's folder, its experiments/ root, ours, cwd."""
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(p) / name for p in cfg.search_paths(base / "x")]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise cfg.ConfigError(f"{where}: gin file {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def axes_items(axes) -> list[tuple[str, list]]:
    return [item for axis in axes for item in axis]


def _strings(value: Any, key: str, where: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise cfg.ConfigError(f"{where}: {key} must be a string or a list of strings")
    return value


def _axes(data: dict, where: str) -> list[list[tuple[str, list]]]:
    """[[(key, values)], ...]: one inner list per axis; a zip group is one axis of several keys."""
    product = data.get("product", {})
    zips = data.get("zip", [])
    zips = [zips] if isinstance(zips, dict) else zips
    if not isinstance(product, dict) or not isinstance(zips, list):
        raise cfg.ConfigError(f"{where}: [product] must be a table and [[zip]] tables of key = [values]")
    axes = [[(k, v)] for k, v in product.items()]
    axes += [list(group.items()) for group in zips]
    keys: list[str] = []
    for axis in axes:
        for key, values in axis:
            if not isinstance(values, list) or not values:
                raise cfg.ConfigError(f"{where}: {key!r} must map to a non-empty list of values")
            if key == NAME_KEY and (len(axis) == 1 or not all(isinstance(v, str) for v in values)):
                raise cfg.ConfigError(f"{where}: 'name' belongs in a [[zip]] group beside what it names, as strings")
            if key not in SPECIAL_KEYS and not re.fullmatch(r"[\w.%/]+\.\w+", key):
                raise cfg.ConfigError(f"{where}: {key!r} is not a gin binding key like 'masking.random.ratio'")
            if key in keys:
                raise cfg.ConfigError(f"{where}: {key!r} varies in two places")
            keys.append(key)
        lengths = {k: len(v) for k, v in axis}
        if len(set(lengths.values())) > 1:
            raise cfg.ConfigError(f"{where}: a zip group needs lists of equal length; got {lengths}")
    for axis in axes:
        rows = [repr(tuple(values[i] for _, values in axis)) for i in range(len(axis[0][1]))]
        if len(set(rows)) != len(rows):
            what = repr(axis[0][0]) if len(axis) == 1 else f"the zip group {[k for k, _ in axis]}"
            raise cfg.ConfigError(f"{where}: {what} lists a value twice")
    return axes


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other varying key ends with."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
                break
        labels[key] = label
    return labels


def _template_value(key: str, value: Any) -> str:
    if key == FILES_KEY:
        return _file_slug(value)
    if key == BINDINGS_KEY:
        return _bindings_slug(value)
    return slug(value)


def _render_name(template: str, fragments: dict, chosen, labels: dict, where: str) -> str:
    values = {}
    for key, value in chosen:
        text = _template_value(key, value)
        values[key] = values[labels.get(key, key)] = text

    def sub(m):
        if m.group(1) not in values:
            raise cfg.ConfigError(f"{where}: run_name uses {{{m.group(1)}}}; varying keys: {', '.join(values)}")
        return values[m.group(1)]

    name = slug(re.sub(r"\{([^{}]+)\}", sub, template))
    return name


def _evaluation(data: dict, where: str) -> dict:
    if not isinstance(data, dict) or set(data) - set(EVAL_KEYS):
        raise cfg.ConfigError(f"{where}: [eval] takes {', '.join(EVAL_KEYS)}")
    if not data.get("enabled", True):
        return {}
    out = {k: v for k, v in data.items() if k != "enabled"}
    if "sample_steps" in out:
        out["sample_steps"] = str(out["sample_steps"])
    out.setdefault("metrics", None)
    return out


# -- validation --------------------------------------------------------------------------------------
def validate(points: Sequence[Point], evaluation: dict | None = None, *, world: int = 1,
             gpus: bool = True) -> dict[str, str]:
    """Check every point without training: gin parses, the trainer's options can run on a job of
    ``world`` processes with (``gpus``) or without GPUs (``training.loop.check_options``), data
    exists, the model builds (meta device), the evaluation applies to the data, the run dir is not
    nested in another run and does not hold a run of another config.

    Returns {point name (or "[eval]"): one-line problem}; empty when all is fine. Gin is left cleared.
    """
    import gin
    import torch

    from mdtzoo.registry import DATASETS, METRICS
    from mdtzoo.training.loop import build_for_dataset, check_bound_options, configured_diffusion
    from mdtzoo.training.rundir import _normalise

    problems: dict[str, str] = {}
    evaluation = evaluation or {}
    metrics = evaluation.get("metrics") or ()
    try:
        for name in metrics:
            METRICS.get(name)
        for key in ("ref", "weights"):
            if evaluation.get(key) and not Path(evaluation[key]).exists():
                raise FileNotFoundError(f"[eval] {key} = {evaluation[key]!r} does not exist")
        if evaluation.get("vae"):
            from mdtzoo.vae import check_vae_available

            check_vae_available(evaluation["vae"])
    except Exception as e:  # noqa: BLE001
        problems["[eval]"] = _one_line(e)
    datasets: dict[tuple, Any] = {}   # image folders are listed once, not once per point
    for p in points:
        try:
            resolved = cfg.parse(p.gin_files, p.bindings)
            try:
                name = gin.query_parameter("train.dataset")
            except ValueError:
                raise cfg.ConfigError("train.dataset is not bound (e.g. train.dataset = 'datasets.relations')") from None
            key = (name,) + tuple(line for line in resolved.splitlines() if line.startswith(f"{name}."))
            if key not in datasets:
                datasets[key] = DATASETS.build(name, split="train")
            with torch.device("meta"):
                model = build_for_dataset(datasets[key])
                configured_diffusion()
            check_bound_options(world, torch.device("cuda" if gpus else "cpu"), datasets[key], model)
            if "relation_acc" in metrics and not hasattr(datasets[key], "oracle"):
                raise ValueError(f"[eval] relation_acc needs the relations data (an oracle); {name} has none")
            sampling = [m for m in metrics if m != "heldout_loss"]
            if getattr(datasets[key], "latent", False) and sampling and not evaluation.get("vae"):
                raise ValueError(f"[eval] {', '.join(sampling)} sample images from latents: set vae = 'ema' (or a path)")
            config_file = Path(p.run_dir) / "config.gin"
            if config_file.is_file() and _normalise(config_file.read_text()) != _normalise(resolved):
                raise ValueError(f"{p.run_dir} holds a run of a different config; use another --root")
        except Exception as e:  # noqa: BLE001  (report every point's problem, whatever it is)
            problems[p.name] = _one_line(e)
        finally:
            gin.clear_config()
    for p in points:
        inside = _run_ancestor(Path(p.run_dir), [Path(q.run_dir) for q in points if q is not p])
        if inside:
            problems.setdefault(p.name, f"run dir {p.run_dir} is inside another run ({inside})")
    return problems


def _run_ancestor(path: Path, others: Sequence[Path]) -> str | None:
    for parent in path.parents:
        if parent in others or (parent / "config.gin").is_file() or (parent / "DONE").is_file():
            return str(parent)
    return None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("In call to configurable")]  # gin's call trail
    text = " | ".join(lines)
    return f"{type(error).__name__}: {text}"
