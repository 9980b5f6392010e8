"""Process-group start-up: the backend and DeepSpeed's comm layer.

Where this process sits (rank, world, master) comes from `launch_env` (torchrun, Slurm,
Kubernetes or a single process; see launch_env.py). No GPU -> gloo on CPU; GPUs -> NCCL.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import torch

from vlm_train.config import ParallelConfig
from vlm_train.parallel.launch_env import LaunchEnv, launch_env

__all__ = ["LaunchEnv", "init_distributed", "launch_env", "pick_backend", "shutdown"]


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
