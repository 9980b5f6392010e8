"""Where this process sits in the job: the one place that reads the launcher's environment.

Launchers, in the order they are trusted:

1. torchrun (and anything else that sets RANK and WORLD_SIZE, such as a Kubeflow PyTorchJob pod
   with one process per pod): RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
   Checked first because torchrun also runs inside Slurm steps and Kubernetes pods, where the
   Slurm/Kubernetes variables describe the node's launcher task, not this worker.
2. A Slurm job step (srun), one task per process: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;
   the master is the first host of the step's node list (MASTER_ADDR wins when set), the port
   MASTER_PORT or 20000 + SLURM_JOB_ID % 10000 (slurm/common.sh derives the same one). The batch
   shell itself also carries SLURM_PROCID, so only a step (SLURM_STEP_ID set) counts: a plain
   `python -m vlm_train.train` in an sbatch script is a single process, not rank 0 of a world
   that never starts.
3. A Kubernetes Indexed Job pod running one process (launch/k8s.py): JOB_COMPLETION_INDEX (set by
   the Job controller) is the rank; NNODES, MASTER_ADDR and MASTER_PORT come from the manifest.
   With NPROC_PER_NODE > 1 the pod must start torchrun (docker/entrypoint.sh does), which puts
   us in case 1.
4. Nothing: a single process on a free local port.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vlm_train.errors import UserError

DEFAULT_MASTER_PORT = 29500


class LaunchError(UserError):
    """Launcher variables that are missing, malformed or contradictory."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's rank, its rank on the node, the world size, and where rank 0 listens."""

    rank: int
    local_rank: int
    world: int
    master_addr: str
    master_port: int
    source: str = "single"  # torchrun | slurm | kubernetes | single

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world or not 0 <= self.local_rank < self.world:
            raise LaunchError(
                f"{self.source} launch environment is inconsistent: rank {self.rank}, "
                f"local rank {self.local_rank}, world size {self.world}"
            )


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launcher's view of this process (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    readers: tuple[Callable[[Mapping[str, str]], LaunchEnv | None], ...] = (
        _from_torchrun,
        _from_slurm,
        _from_kubernetes,
    )
    for read in readers:
        found = read(env)
        if found is not None:
            return found
    return LaunchEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    # A PyTorchJob pod with nprocPerNode > 1 carries the node's rank in RANK and the number of
    # all workers in WORLD_SIZE, meant for torchrun; started without it, ranks would collide.
    if "LOCAL_RANK" not in env and _int(env, "PET_NPROC_PER_NODE", 1) > 1:
        raise LaunchError(
            "this pod runs PET_NPROC_PER_NODE > 1 workers: start vlm_train through torchrun "
            "(docker/entrypoint.sh does), not directly"
        )
    return LaunchEnv(
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world=_int(env, "WORLD_SIZE"),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
        source="torchrun",
    )


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv | None:
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if not in_step or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        master = env["MASTER_ADDR"]
    elif nodelist:
        master = first_host(nodelist)
    else:
        raise LaunchError("a Slurm step without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's address")
    return LaunchEnv(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID", 0),
        world=_int(env, "SLURM_NTASKS"),
        master_addr=master,
        master_port=_int(env, "MASTER_PORT", slurm_port(env)),
        source="slurm",
    )


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port per job, so two jobs sharing a node do not collide (below the ephemeral range)."""
    return 20000 + _int(env, "SLURM_JOB_ID", 0) % 10000


def _from_kubernetes(env: Mapping[str, str]) -> LaunchEnv | None:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    missing = [name for name in ("NNODES", "MASTER_ADDR") if name not in env]
    if missing:
        raise LaunchError(
            f"a Kubernetes Indexed Job pod without {', '.join(missing)}: render the manifest with "
            "`python -m launch.k8s`, or set them in the pod spec"
        )
    if _int(env, "NPROC_PER_NODE", 1) > 1:
        raise LaunchError(
            "NPROC_PER_NODE > 1 in this pod: start vlm_train through torchrun (docker/entrypoint.sh does)"
        )
    return LaunchEnv(
        rank=_int(env, "JOB_COMPLETION_INDEX"),
        local_rank=0,
        world=_int(env, "NNODES"),
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
        source="kubernetes",
    )


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


# --- Slurm's compressed host lists: "dgx[001-004,010],login1", "rack[1-2]-gpu[01-02]" -------------

_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm node list, in Slurm's order (as `scontrol show hostnames` prints them)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_item(item))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: rank 0 runs there."""
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise LaunchError(f"empty Slurm node list {nodelist!r}")
    return hosts[0]


def _split_top_level(nodelist: str) -> list[str]:
    # Commas separate hosts, except inside brackets where they separate ranges.
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in Slurm node list {nodelist!r}")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> list[str]:
    match = _BRACKET.search(item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    return [head + number + rest for number in _expand_ranges(match.group(1), item) for rest in _expand_item(tail)]


def _expand_ranges(ranges: str, item: str) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise LaunchError(f"bad range {part!r} in Slurm node list item {item!r}")
        width = len(low)  # zero padding follows the first number: [08-10] -> 08, 09, 10
        numbers.extend(str(n).zfill(width) for n in range(int(low), int(high or low) + 1))
    return numbers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
