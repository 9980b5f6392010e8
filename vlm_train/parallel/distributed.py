"""Process-group start-up: the launch environment, the backend, and DeepSpeed's comm layer.

Reads torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain
`vlm-train` start is a world of one. No GPU -> gloo on CPU; GPUs -> NCCL.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from vlm_train.config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world: int
    master_addr: str
    master_port: int


def launch_env() -> LaunchEnv:
    """The launcher's view of this process; a single process when no launcher set it."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return LaunchEnv(0, 0, 1, "127.0.0.1", _free_port())
    return LaunchEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world=int(env["WORLD_SIZE"]),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: ParallelConfig, env: LaunchEnv) -> torch.device:
    """Start the default process group through DeepSpeed and return this rank's device."""
    for key, value in (
        ("RANK", env.rank),
        ("LOCAL_RANK", env.local_rank),
        ("WORLD_SIZE", env.world),
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
    ):
        os.environ[key] = str(value)
    backend = pick_backend(cfg)
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_comm_build()
    import deepspeed

    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    return torch.device("cuda", env.local_rank) if backend == "nccl" else torch.device("cpu")


def _skip_shm_comm_build() -> None:
    # DeepSpeed compiles a shared-memory all-reduce op for its CPU accelerator at start-up
    # (40-47 s on 2 cores); gloo does the work without it.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
