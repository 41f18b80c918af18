"""Checkpoints: written atomically, read with ``weights_only=True``, never unpickling code.

A checkpoint is one ``.pt`` file holding plain containers of tensors and numbers:
model, EMA, optimiser, step, data position, RNG state and the resolved config.
It is written to a temporary file in the same folder and renamed over the final
name, so a kill at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` via a temporary file + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := NAME.match(p))]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1][1] if ckpts else None


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint dict, loaded with weights_only=True; clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (weights_only=True): {e}") from None
    if not isinstance(obj, dict) or "model" not in obj or "step" not in obj:
        raise ValueError(f"{path} is not an mdtzoo training checkpoint (no 'model'/'step' entries)")
    return obj


def prune(folder: str | os.PathLike, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the newest); steps that are multiples
    of ``keep_every`` are kept for good (to evaluate learning curves, e.g. Table 1's 400k)."""
    ckpts = [(s, p) for s, p in list_checkpoints(folder) if not (keep_every and s % keep_every == 0)]
    for _, path in ckpts[: max(len(ckpts) - max(keep, 1), 0)]:
        path.unlink(missing_ok=True)
