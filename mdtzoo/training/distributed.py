"""Rank and world from the environment (torchrun or SLURM), process-group set-up, seeding.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a SLURM job step with one task per GPU
sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Either works; neither means one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """(rank, world, local rank) from torchrun's or SLURM's variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return DistInfo(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group when world > 1 (nccl on GPU, gloo on CPU); pick the device."""
    info = env_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if info.world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: the first node hosts the store
            os.environ["MASTER_ADDR"] = _slurm_master() or "127.0.0.1"
            os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", rank=info.rank, world_size=info.world,
            device_id=dev if dev.type == "cuda" else None,
        )
    return info, dev


def _slurm_master() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    # "node[01-04],other" -> "node01"; plain "node01,node02" -> "node01"
    first = nodes.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_generator(seed: int, step: int, rank: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator for one (step, rank, stream): every random draw of a training step comes from
    one of these, so a resumed run replays exactly the uninterrupted run's draws."""
    g = torch.Generator(device=device)
    # Distinct, stable 62-bit seeds per (seed, step, rank, stream).
    g.manual_seed((seed * 1_000_003 + step * 8191 + rank * 131 + stream) % (2**62))
    return g
