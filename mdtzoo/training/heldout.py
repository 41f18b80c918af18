"""Held-out diffusion loss: the learning-progress curve that needs no Inception weights.

On a fixed held-out split, at a fixed set of timesteps, with noise from a fixed seed,
the (EMA) model's full-pass ε-MSE and variational-bound term (bits/dim) are averaged.
Everything is deterministic for a seed, so two checkpoints (or two models) are
compared on exactly the same noisy inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset


@torch.no_grad()
def heldout_loss(model, diffusion, dataset, *, num_timesteps: int = 10, max_items: int = 256,
                 batch_size: int = 64, seed: int = 0, device="cpu") -> dict[str, float]:
    """{'heldout_mse': ..., 'heldout_vb': ... (bits/dim per term), per-t 'heldout_mse_t{t}'} on ``dataset``.

    Timesteps: ``num_timesteps`` evenly spaced indices over the diffusion's steps
    (0 and T-1 included); each item is evaluated at every one of them.
    """
    n = min(len(dataset), max_items)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    steps = np.unique(np.linspace(0, diffusion.num_timesteps - 1, num_timesteps).round().astype(int))
    was_training = model.training
    model.eval()
    sums = {int(s): [0.0, 0.0] for s in steps}
    seen = 0
    for x0, y in loader:
        x0, y = x0.to(device), y.to(device)
        b = x0.shape[0]
        for s in steps:
            g = torch.Generator(device=device).manual_seed(seed * 100_003 + int(s) * 7 + seen)
            noise = torch.randn(x0.shape, device=device, generator=g)
            t = torch.full((b,), int(s), device=device, dtype=torch.long)
            terms = diffusion.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})
            sums[int(s)][0] += terms["mse_raw" if "mse_raw" in terms else "mse"].sum().item()
            sums[int(s)][1] += terms["vb"].sum().item()
        seen += b
    model.train(was_training)
    out = {f"heldout_mse_t{s}": v[0] / seen for s, v in sums.items()}
    out["heldout_mse"] = float(np.mean([v[0] / seen for v in sums.values()]))
    out["heldout_vb"] = float(np.mean([v[1] / seen for v in sums.values()]))
    return out
