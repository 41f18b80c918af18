"""The run directory: the unit of truth of a training run (SPEC section 7).

    RUN/
      config.gin            the resolved gin config the run was started with
      operative_config.gin  the bindings actually used (written after the first step)
      metrics.jsonl         one JSON object per logged step (and per held-out evaluation)
      checkpoints/          ckpt_XXXXXXXX.pt, atomic, loaded weights_only
      samples/              PNG sample grids at intervals
      DONE                  written last, with the final step; a finished run is never touched again
      FAILED                the error of a run that stopped (NaN loss, ...), removed on resume
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from mdtzoo.training import checkpoint as ckpt


class RunFinishedError(FileExistsError):
    """The run directory holds a finished run (DONE); it is never overwritten."""


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.gin")
    operative_config = property(lambda self: self.path / "operative_config.gin")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")
    done = property(lambda self: self.path / "DONE")
    failed = property(lambda self: self.path / "FAILED")

    def is_done(self) -> bool:
        return self.done.is_file()

    def matches(self, config_text: str) -> bool:
        """Whether this run was started with ``config_text`` (ignoring blank lines and trailing spaces)."""
        return self.config.is_file() and _normalise(self.config.read_text()) == _normalise(config_text)

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.checkpoints)

    def prepare(self, config_text: str) -> None:
        """Create the folder or check that it belongs to this config; refuse finished runs."""
        if self.is_done():
            raise RunFinishedError(
                f"{self.path} holds a finished run (DONE: {self.done.read_text().strip()}); "
                "it is never overwritten: choose another run directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.is_file():
            if not self.matches(config_text):
                raise ValueError(
                    f"{self.path} was started with a different config ({self.config}); resuming it with "
                    "this one would mix two experiments: choose another run directory"
                )
        else:
            write_text(self.config, config_text)
        self.failed.unlink(missing_ok=True)

    def log(self, record: dict) -> None:
        """Append one JSON line (flushed, so a killed run keeps every logged step)."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records of steps after ``after_step`` (logged by a killed run past its last checkpoint)."""
        if not self.metrics.is_file():
            return
        kept = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        write_text(self.metrics, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def mark_done(self, step: int) -> None:
        write_text(self.done, f"step {step}\n")

    def mark_failed(self, message: str) -> None:
        write_text(self.failed, message + "\n")


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


def write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temporary file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
