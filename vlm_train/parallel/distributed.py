"""Process-group start-up: the backend and DeepSpeed's comm layer.

Where this process sits (rank, world, master) comes from `launch_env` (torchrun, Slurm,
Kubernetes or a single process; see launch_env.py). No GPU -> gloo on CPU; GPUs -> NCCL.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch

from vlm_train.config import ParallelConfig
from vlm_train.parallel import signals
from vlm_train.parallel.launch_env import LaunchEnv, launch_env

__all__ = ["LaunchEnv", "exit_failed_rank", "init_distributed", "launch_env", "pick_backend", "shutdown"]


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
    # A stuck or dead peer fails the next collective after timeout_s (gloo and NCCL honour the
    # group's timeout; DeepSpeed passes it on to init_process_group) instead of hanging the job.
    _init_after_torchrun_restart(backend, env, timedelta(seconds=cfg.timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    signals.default_deadline_s = cfg.timeout_s  # and a stop request gets as long to be honoured
    return torch.device("cuda", env.local_rank) if backend == "nccl" else torch.device("cpu")


def _init_after_torchrun_restart(backend: str, env: LaunchEnv, timeout: timedelta) -> None:
    """After `torchrun --max-restarts` restarted the group, rendezvous under a fresh key prefix.

    torchrun's store outlives the workers, and the default group's keys (each rank's address)
    of the previous attempt are still in it: a new rank can read a dead peer's address and fail
    with "Connection reset by peer". DeepSpeed adopts a group that is already initialised.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch.distributed.TCPStore(
        env.master_addr,
        env.master_port,
        env.world,
        is_master=not agent_store and env.rank == 0,
        timeout=timeout,
    )
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"restart_{restart}/", store),
        rank=env.rank,
        world_size=env.world,
        timeout=timeout,
    )


def _skip_shm_comm_build() -> None:
    # DeepSpeed compiles a shared-memory all-reduce op for its CPU accelerator at start-up
    # (40-47 s on 2 cores); gloo does the work without it.
    comm_torch: Any = importlib.import_module("deepspeed.comm.torch")  # Any: ModuleType has no build_shm_op
    comm_torch.build_shm_op = lambda: None


def shutdown() -> None:
    """Destroy the process groups; through DeepSpeed where it is set up, so that it also drops the
    groups it cached (a clone of the world among them): a later world in this process (tests run
    several) would otherwise be handed a destroyed group."""
    import sys

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if deepspeed_comm is not None and getattr(deepspeed_comm, "cdb", None) is not None:
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def exit_failed_rank(err: Exception, world: int, rank: int) -> None:
    """End a failed rank of a multi-rank job at once, with the CLI's message and exit code.

    After a collective timed out or a peer died, a normal interpreter exit can wait forever
    (data loader workers, process-group threads tied to the dead peer), and torchrun only
    notices a failure when the process is gone. A preemption stop is orderly and returns.
    """
    from vlm_train.errors import UserError, report

    if world == 1 or isinstance(err, signals.Preempted):
        return
    if isinstance(err, UserError):
        quiet = err.same_on_every_rank and rank != 0  # every rank raised it: one line is enough
        code = err.exit_code if quiet else report("vlm-train", err)
    else:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
