"""Process-group start-up: the backend and DeepSpeed's comm layer.

Where this process sits (rank, world, master) comes from `launch_env` (torchrun, Slurm,
Kubernetes or a single process; see launch_env.py). No GPU -> gloo on CPU; GPUs -> NCCL.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vlm_train.config import ParallelConfig
from vlm_train.errors import LayoutError
from vlm_train.parallel import signals
from vlm_train.parallel.launch_env import LaunchEnv, launch_env

__all__ = ["LaunchEnv", "exit_failed_rank", "init_distributed", "launch_env", "pick_backend", "shutdown"]


REQUIRE_CUDA_ENV = "VLM_REQUIRE_CUDA"  # 1: a node without a usable GPU fails instead of training on CPU
REQUIRE_NET_ENV = "VLM_NCCL_REQUIRE_NET"  # IB: fail at start unless NCCL's network is InfiniBand/RoCE


def pick_backend(cfg: ParallelConfig, environ: Mapping[str, str] = os.environ) -> str:
    """nccl with GPUs, gloo without; a node that was given GPUs but cannot use them fails here, in
    one line, instead of training on CPU (or hanging the job: its peers chose NCCL)."""
    cuda = torch.cuda.is_available()
    expected = gpus_expected(environ)
    if cfg.backend == "nccl" or (cfg.backend == "auto" and expected):
        if not cuda:
            why = f"{expected}, but" if expected else "parallel.backend=nccl, but"
            raise LayoutError(
                f"{why} torch sees no usable GPU on {socket.gethostname()} (driver, container runtime or CUDA "
                "forward compatibility; `nvidia-smi` there tells): refusing to train on CPU; "
                "parallel.backend=gloo runs on CPU on purpose"
            )
        return "nccl"
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if cuda else "gloo"


def gpus_expected(environ: Mapping[str, str]) -> str | None:
    """Why this process should see a GPU (its launcher allocated some), or None."""
    if environ.get(REQUIRE_CUDA_ENV) == "1":
        return f"{REQUIRE_CUDA_ENV}=1"
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and int(gpus) > 0:
        return f"Slurm allocated {gpus} GPU(s) on this node"
    return None


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
    elif cfg.tensor_parallel > 1:
        # What NVIDIA's Megatron launchers set for tensor parallelism (before the CUDA context):
        # one hardware queue keeps TP communication ordered with compute, so it can overlap.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        os.environ.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    net_log = _log_nccl_network() if backend == "nccl" and os.environ.get(REQUIRE_NET_ENV) else None
    import deepspeed

    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    # A stuck or dead peer fails the next collective after timeout_s (gloo and NCCL honour the
    # group's timeout; DeepSpeed passes it on to init_process_group) instead of hanging the job.
    _init_after_torchrun_restart(backend, env, timedelta(seconds=cfg.timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    signals.default_deadline_s = cfg.timeout_s  # and a stop request gets as long to be honoured
    if net_log is not None:
        _require_nccl_network(net_log, os.environ[REQUIRE_NET_ENV], env.local_rank)
    return torch.device("cuda", env.local_rank) if backend == "nccl" else torch.device("cpu")


def _log_nccl_network() -> Path:
    """NCCL's INIT/NET messages of this process into a file of their own (not the job's log)."""
    path = Path(tempfile.gettempdir()) / f"vlm-nccl-{socket.gethostname()}-{os.getpid()}.log"
    os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=str(path))
    return path


def _require_nccl_network(log: Path, required: str, local_rank: int) -> None:
    """One collective creates the communicator; NCCL has then logged the network it chose."""
    tensor = torch.ones(1, device=torch.device("cuda", local_rank))
    torch.distributed.all_reduce(tensor)
    torch.cuda.synchronize(local_rank)
    problem = nccl_network_problem(log.read_text() if log.exists() else "", required)
    if problem:
        raise LayoutError(f"{REQUIRE_NET_ENV}={required}: {problem} (full NCCL log: {log})")


def nccl_network_problem(nccl_log: str, required: str) -> str | None:
    """None when NCCL says it uses the required network ("Using network IB"; IBext is NVIDIA's
    SHARP plugin over the same HCAs), else what it chose instead."""
    chosen = [line.split("Using network ", 1)[1].strip() for line in nccl_log.splitlines() if "Using network " in line]
    if not chosen:
        return "NCCL logged no network choice (no inter-node communicator?)"
    if required.upper() == "IB" and all(name.startswith("IB") for name in chosen):
        return None
    no_ib = [line.split("NCCL INFO ", 1)[-1] for line in nccl_log.splitlines() if "NET/IB : No device found" in line]
    return f"NCCL chose network {chosen[0]}" + (f" ({no_ib[0].strip()})" if no_ib else "")


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
