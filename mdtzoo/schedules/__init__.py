"""Noise schedules (registry ``schedule``) and loss weightings (registry ``weighting``).

A schedule is a function ``(num_steps) -> betas`` (float64 numpy, shape (num_steps,));
a weighting is a small class whose instances map the per-sample signal-to-noise ratio
to a weight on the MSE of the model's target. Adding one is one decorated function or
class in the matching module; tests/test_schedules.py then covers it automatically.
"""

from mdtzoo.schedules import betas, weighting  # noqa: F401  (registration)
from mdtzoo.schedules.betas import alphas_cumprod
from mdtzoo.schedules.weighting import PREDICTIONS

__all__ = ["alphas_cumprod", "PREDICTIONS"]
