"""Gaussian noise drawn from a generator, or from one generator per sample.

Every random draw in sampling goes through ``randn`` so that a run is reproducible
from its generator(s). With a list of generators (one per sample, as diffusers
allows), sample i's noise depends only on generator i: the result does not depend on
how samples are grouped into batches (mdtzoo.sample seeds one generator per index).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape, generator: Generator = None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) on ``device``.

    generator: None (torch's global RNG), one torch.Generator, or a list of B generators.
    Draws happen on each generator's own device and are then moved, so a CPU generator
    gives the same numbers whatever device the samples live on.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} samples")
    draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    if len({d.device for d in draws}) == 1:  # the usual case: one copy to the samples' device, not B
        return torch.stack(draws).to(device)
    return torch.stack([d.to(device) for d in draws])
