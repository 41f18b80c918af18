"""Gin plumbing: parse gin files and bindings with clear errors; the ``build`` root.

Gin files name components by their qualified registry names (``models.mdt_s2``,
``masking.random``); ``build.model`` picks the preset and ``build.input_size`` /
``build.in_channels`` / ``build.num_classes`` describe the data. Later entry points
(train, sample, eval) call :func:`build` to get their model, so one binding
describes the model everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import gin
import gin.config as _gin_config
from torch import nn

from mdtzoo.registry import FAMILIES, MODELS

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ConfigError(ValueError):
    """A gin file or binding that cannot be parsed or resolved; the message says what and where."""


@gin.configurable("build")
def build(
    model: Callable = gin.REQUIRED,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
):
    """The model root: ``build.model = @models.mdt_s2`` (no parentheses: build supplies the data shape).

    Defaults describe ImageNet-256 latents (32x32x4, 1000 classes).
    """
    if isinstance(model, str):
        model = functools.partial(MODELS.build, model)
    if not callable(model) or isinstance(model, nn.Module):
        raise ConfigError(
            "build.model must reference a preset without parentheses, e.g. `build.model = @models.mdt_s2`, "
            "so that build can pass the data shape"
        )
    return model(input_size=input_size, in_channels=in_channels, num_classes=num_classes)


def search_paths(config_file: str | os.PathLike) -> list[str]:
    """Where ``include`` statements are resolved: the file's folder, its ``experiments/`` root, ours."""
    path = Path(config_file).resolve()
    paths = [path.parent]
    for parent in path.parents:
        if parent.name == "experiments":
            paths.append(parent)
            break
    paths += [EXPERIMENTS_DIR, Path.cwd()]
    out: list[str] = []
    for p in paths:
        if str(p) not in out:
            out.append(str(p))
    return out


def _safe_file_readers() -> None:
    """Make gin's file-existence checks say False instead of raising.

    gin's Python-package reader raises TypeError when a folder on sys.path shares an include's
    first component -- e.g. a ``runs/`` folder in the working directory against
    ``include 'runs/imagenet256_latents.gin'`` -- instead of letting the next search path match.
    """
    from gin import config as gin_config

    def safe(check):
        def exists(path):
            try:
                return check(path)
            except Exception:  # noqa: BLE001 - "cannot tell" means "not here"
                return False

        exists.mdtzoo_safe = True
        return exists

    gin_config._FILE_READERS[:] = [(reader, check if getattr(check, "mdtzoo_safe", False) else safe(check))
                                   for reader, check in gin_config._FILE_READERS]


def parse(config_files: Sequence[str | os.PathLike] = (), bindings: Iterable[str] = ()) -> str:
    """Clear gin, then parse ``config_files`` and ``bindings`` (later ones win). Returns config_str().

    Raises ConfigError naming the file or binding at fault and, for unknown components,
    the known names of that family.
    """
    gin.clear_config()
    _safe_file_readers()
    for f in config_files:
        if not Path(f).is_file():
            raise ConfigError(f"gin file not found: {f}")
        for p in search_paths(f):
            gin.add_config_file_search_path(p)
    try:
        with _quiet_gin_search():
            for f in config_files:
                gin.parse_config_file(str(f))
        bindings = list(bindings)
        if bindings:
            gin.parse_config(bindings)
    except (ValueError, SyntaxError, IOError) as e:
        raise ConfigError(explain_gin_error(e)) from None
    return config_str()


def config_str(operative: bool = False) -> str:
    """gin's config string with every component under its qualified name (``masking.random.ratio``).

    gin prints minimal selectors (``random.ratio``); we print the names the gin files use.
    """
    text = gin.operative_config_str() if operative else gin.config_str()
    return "\n".join(_qualify_line(line) for line in text.splitlines()) + "\n"


def _qualify_line(line: str) -> str:
    m = re.match(r"^(# Parameters for |)([\w.]+?)(\.\w+ =|:)(.*)$", line)
    if not m:
        return line
    match = _gin_config._REGISTRY.get_match(m.group(2))
    if match is None:
        return line
    selector = match.selector
    if selector.startswith("mdtzoo."):  # roots are registered under their bare names
        selector = match.name
    return f"{m.group(1)}{selector}{m.group(3)}{m.group(4)}"


class _DropSearchMisses(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")


@contextlib.contextmanager
def _quiet_gin_search():
    """Gin logs an error for every search path an include is not in; only the final miss matters."""
    flt = _DropSearchMisses()
    logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def explain_gin_error(error: Exception) -> str:
    """Gin's message, plus the known names when the problem is an unknown component."""
    message = str(error)
    m = re.search(r"No configurable matching (?:reference )?'@?([\w.]+?)(?:\(\))?'", message)
    if m:
        name = m.group(1)
        family_name = name.split(".")[0] if "." in name else None
        if family_name in FAMILIES:
            known = ", ".join(FAMILIES[family_name].names())
            message += f"\nunknown {family_name} component {name!r}; known {family_name} components: {known}"
        else:
            message += (
                f"\n{name!r} is not a known configurable; components are named <family>.<name> with "
                f"families {', '.join(FAMILIES)} (see `mdtzoo list`); roots: build"
            )
    return message


def call_root(fn: Callable, *args, **kwargs):
    """Call a gin root, turning gin's missing-binding and bad-value errors into ConfigError."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        m = re.search(r"Required bindings for `(\w+)` not provided in config: \[(.*)\]", str(e))
        if not m:
            raise
        missing = ", ".join(f"{m.group(1)}.{p.strip(chr(39))}" for p in m.group(2).split(", "))
        hint = f" (e.g. `build.model = @models.mdt_s2`; presets: {', '.join(MODELS.names())})" if "build" in missing else ""
        raise ConfigError(f"required gin binding(s) missing: {missing}{hint}") from None
    except (ValueError, TypeError) as e:
        # gin appends "In call to configurable 'x' (<function x at 0x...>)" lines; keep the message.
        message = "\n".join(l for l in str(e).splitlines() if not l.strip().startswith("In call to configurable"))
        raise (ValueError if isinstance(e, ValueError) else TypeError)(message) from None
