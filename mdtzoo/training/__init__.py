"""Training: the ``train`` gin root, the two-pass objective, run directories, checkpoints."""

from mdtzoo.training.loop import NonFiniteLossError, train
from mdtzoo.training.rundir import RunDir, RunFinishedError

__all__ = ["train", "RunDir", "RunFinishedError", "NonFiniteLossError"]
