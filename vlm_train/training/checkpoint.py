"""Checkpoints: DeepSpeed engine state plus our trainer state, with an atomic `latest` pointer.

    <run.dir>/checkpoints/step_<N>/       engine state (DeepSpeed layout, ZeRO-partitioned),
                                          trainer_rank<R>.pt (step, data position, RNG) per rank,
                                          config.yaml
    <run.dir>/checkpoints/latest          names the newest COMPLETE step folder

`latest` is replaced atomically only after every rank has finished writing, so a crash mid-save
never leaves it naming a partial folder.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlm_train.config import Config, to_yaml
from vlm_train.errors import ConfigError

LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoint_root(run_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def save(engine, run_dir: Path, step: int, trainer_state: dict, cfg: Config) -> Path:
    """Collective: every rank writes its shards, then rank 0 moves `latest` and prunes old ones."""
    tag = f"step_{step}"
    root = checkpoint_root(run_dir)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = dist.get_rank()
    _write_atomic(root / tag / f"trainer_rank{rank:05d}.pt", lambda f: torch.save(trainer_state, f))
    if rank == 0:
        _write_atomic(root / tag / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
    dist.barrier()
    if rank == 0:
        _write_atomic(root / LATEST, lambda f: f.write(tag.encode()))
        prune(root, keep=cfg.train.keep_last)
    dist.barrier()
    return root / tag


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step folders; never the one `latest` names."""
    if keep <= 0:
        return
    latest = (root / LATEST).read_text().strip()
    steps = sorted(
        (p for p in root.glob("step_*") if p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1])
    )
    for folder in steps[:-keep]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


def load(engine, folder: Path) -> dict:
    """Restore the engine from `folder` and return this rank's trainer state."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise ConfigError(f"{folder} could not be loaded by DeepSpeed: is it a vlm_train checkpoint?")
    trainer_file = folder / f"trainer_rank{dist.get_rank():05d}.pt"
    if not trainer_file.is_file():
        raise ConfigError(f"{folder} has no {trainer_file.name}: it was written by a different number of ranks")
    return torch.load(trainer_file, map_location="cpu", weights_only=True)


def consolidated_state_dict(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from one checkpoint folder, whatever the ZeRO stage."""
    if zero_stage == 0:
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What must match for a checkpoint to resume: the model, the sharding and the data layout.
RESUME_KEYS = (
    "vision",
    "llm",
    "connector",
    "parallel.zero_stage",
    "parallel.tensor_parallel",
    "train.micro_batch_size",
    "train.grad_accum",
    "data.urls",
    "data.num_workers",
)


def check_resumable(saved_yaml: str, cfg: Config, folder: Path) -> None:
    """A clear error when the run dir's checkpoint belongs to an incompatible config."""
    from omegaconf import OmegaConf

    saved = OmegaConf.create(saved_yaml)
    current = OmegaConf.structured(cfg)
    differences = []
    for key in RESUME_KEYS:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(current, key)
        if OmegaConf.is_config(old):
            old, new = OmegaConf.to_container(old), OmegaConf.to_container(new)
        if old != new:
            differences.append(f"{key}: {old} -> {new}")
    if differences:
        raise ConfigError(
            f"run.dir={cfg.run.dir} holds checkpoint {folder.name} of an incompatible config "
            f"({'; '.join(differences)}): use a new run.dir or the original settings"
        )
