"""Per-step time of a compiled model with each block a region against stacks as regions, on the CPU.

    python experiments/bench/compile_scope_cpu.py --model mdt_xs2 --input-size 4   # host-bound: 4 tokens
    python experiments/bench/compile_scope_cpu.py --model mdt_s2 --input-size 4

One sample, a full and a masked pass, forward and backward (no optimiser), one thread, inductor's
C++ code; each scope compiled on its own copy of the model and timed twice, alternating (median
of ``--repeats`` steps each). With a few tokens the step is mostly host work -- region calls,
guards, autograd -- plus the parameters' gradients. This says nothing about a GPU step; it shows
what the region calls cost on a host, and whether a scope's code is slower.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mdtzoo.models import build_model
from mdtzoo.models.transformer import COMPILE_SCOPES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mdt_xs2")
    p.add_argument("--input-size", type=int, default=4, help="latent side (tokens = (side / patch)^2)")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = build_model(args.model, input_size=args.input_size, num_classes=10)
    x = torch.randn(1, base.in_channels, args.input_size, args.input_size)
    t, y = torch.tensor([5]), torch.tensor([1])
    mask = base.sample_mask(1, generator=torch.Generator().manual_seed(1)) if base.interp is not None else None
    for scope in COMPILE_SCOPES * 2:
        model = copy.deepcopy(base)
        model.compile_blocks(scope=scope)

        def step():
            loss = model(x, t, y, drop_labels=False).square().sum()
            if mask is not None:
                loss = loss + model(x, t, y, mask, drop_labels=False).square().sum()
            loss.backward()

        begin = time.perf_counter()
        for _ in range(3):
            step()
        warm = time.perf_counter() - begin
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        print(f"{scope}: first 3 steps {warm:.1f} s, step {statistics.median(times) * 1e3:.2f} ms "
              f"(median of {args.repeats})", flush=True)


if __name__ == "__main__":
    main()
