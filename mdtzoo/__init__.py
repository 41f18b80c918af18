"""mdtzoo: a modular component zoo for mask-diffusion research (MDT, DiT).

Importing the package registers every built-in component. Registration modules
are imported here by name, so nothing registers by accident (STYLE.md).
"""

__version__ = "0.1.0"

from mdtzoo import registry  # noqa: F401
from mdtzoo import masking, posenc, interp, models, schedules, diffusion, data, metrics  # noqa: F401,E402  (registration)
from mdtzoo import training, evaluation  # noqa: F401,E402  (the train root, run metrics)
