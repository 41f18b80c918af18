"""Training time of a run from its own log: cumulative seconds per step, for GPU-seconds axes.

The trainer logs, per window of ``log_every`` steps, ``img_per_sec`` over the global batch (and
``world``, its GPU count); a window (a, b] took ``(b - a) x train.global_batch / img_per_sec``
seconds of wall time. Its timer runs from one log line to the next, so the window that starts
right after the trainer paused for other work also holds that work: the start-up (step 0), the
held-out loss (multiples of ``heldout_every``), a checkpoint (``ckpt_every``), a sample grid
(``sample_every``), and every resume (it starts at a checkpoint). :func:`train_seconds` charges
those windows at the median seconds per step of the run's other windows, so the sum is training
time only; a run whose every window starts at such a step keeps its windows as logged.

Logged time is wall time: runs that shared a GPU (experiments/small/run_gpu.py runs several per
GPU) logged slower steps than the GPU would give one run alone. The driver therefore also times
a short solo run of some points and writes ``<sweep root>/calibration.json``
(``{point name: {"sec_per_step": ..., ...}}``); :func:`solo_seconds_per_step` reads it, and
GPU-seconds at step s are then ``s x sec_per_step x world``.

    steps, seconds = train_seconds("runs/small/mdt_seed0")      # (0, 0) first, then one per window
    solo_seconds_per_step("runs/small/mdt_seed0")               # 0.021, or None without calibration
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from mdtzoo.tables.collect import read_config, read_jsonl

CALIBRATION = "calibration.json"
# train()'s defaults for the bindings that decide where it pauses (mdtzoo/training/loop.py).
PAUSE_DEFAULTS = {"train.heldout_every": 0, "train.ckpt_every": 1000, "train.sample_every": 0}


def pause_steps(config: dict) -> tuple[int, ...]:
    """The intervals at which the trainer does other work after a step (0 = never)."""
    out = []
    for key, default in PAUSE_DEFAULTS.items():
        value = config.get(key, default)
        out.append(int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default)
    return tuple(out)


def window_seconds(records: list[dict], global_batch: float, gpus: int = 1) -> list[tuple[float, float, float]]:
    """(start step, end step, GPU-seconds) of each timed train window, in order; a step logged
    twice (a resumed run re-logging past its checkpoint) counts once, the first time."""
    out, last = [], 0.0
    for r in records:
        if r.get("kind") != "train" or not r.get("img_per_sec"):
            continue
        step = float(r["step"])
        if step <= last:
            continue
        seconds = (step - last) * global_batch / float(r["img_per_sec"]) * int(r.get("world", gpus))
        out.append((last, step, seconds))
        last = step
    return out


def train_seconds(run_dir: str | Path, global_batch: float | None = None, gpus: int = 1,
                  correct: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(steps, cumulative GPU-seconds of training) from the run's train records, starting at (0, 0).

    global_batch: default the run's ``train.global_batch`` (256 if unbound). gpus: the GPU count
    where a record lacks ``world``. correct: charge the windows after a pause at the median rate
    (module docstring); False gives the windows as logged.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    batch = float(global_batch if global_batch is not None else config.get("train.global_batch", 256))
    windows = window_seconds(read_jsonl(run_dir / "metrics.jsonl"), batch, gpus)
    if correct and windows:
        pauses = [p for p in pause_steps(config) if p > 0]
        paused = [a == 0 or any(a % p == 0 for p in pauses) for a, _, _ in windows]
        clean = [s / (b - a) for (a, b, s), p in zip(windows, paused) if not p]
        if clean:
            rate = float(np.median(clean))
            windows = [(a, b, rate * (b - a) if p else s) for (a, b, s), p in zip(windows, paused)]
    steps = np.array([0.0] + [b for _, b, _ in windows])
    seconds = np.concatenate([[0.0], np.cumsum([s for _, _, s in windows])]) if windows else np.zeros(1)
    return steps, seconds


def read_calibration(root: str | Path) -> dict:
    """``<root>/calibration.json`` as a dict ({} when there is none or it is unreadable)."""
    path = Path(root) / CALIBRATION
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable ({e}); ignoring the calibration")
        return {}
    return data if isinstance(data, dict) else {}


def solo_seconds_per_step(run_dir: str | Path) -> float | None:
    """Seconds per step of this point run alone on one GPU, from the sweep root's calibration.json
    (the run dir's parent); None when the point was not calibrated."""
    run_dir = Path(run_dir)
    entry = read_calibration(run_dir.parent).get(run_dir.name)
    if isinstance(entry, dict) and isinstance(entry.get("sec_per_step"), (int, float)) and entry["sec_per_step"] > 0:
        return float(entry["sec_per_step"]) * int(entry.get("world", 1))
    return None


def seconds_at(run_dir: str | Path, steps, rate: float | None = None, gpus: int = 1) -> np.ndarray:
    """GPU-seconds of training at ``steps``: ``steps x rate`` with a solo rate (seconds per step),
    else interpolated in the run's logged :func:`train_seconds` (NaN where nothing was logged)."""
    steps = np.asarray(steps, dtype=float)
    if rate is not None:
        return steps * rate
    logged, seconds = train_seconds(run_dir, gpus=gpus)
    if len(logged) < 2:
        return np.full(steps.shape, np.nan)
    out = np.interp(steps, logged, seconds)
    out[steps > logged[-1]] = np.nan
    return out
