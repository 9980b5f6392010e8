"""Checkpoints: the engine's state plus our trainer state, published atomically.

    <run.dir>/checkpoints/step_<N>/       engine state (ZeRO-partitioned, frozen parameters left
                                          out; parallel/engine_checkpoint.py), trainer_rank<R>.pt
                                          (step, data position, RNG) per rank, config.yaml, frozen.json
    <run.dir>/checkpoints/latest          names the newest COMPLETE step folder

A save writes into `step_<N>.partial/`; only when every rank has written its files does rank 0
check the folder and publish it (publish.py: rename into place, then move `latest`). Frozen
weights are rebuilt on resume and checked against `frozen.json` (frozen.py). Every file is read
with `torch.load(weights_only=True)` (`safe_torch_load`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlm_train.config import Config
from vlm_train.errors import ConfigError
from vlm_train.files import write_atomic
from vlm_train.parallel.engine import TrainEngine
from vlm_train.parallel.engine_checkpoint import has_engine_state, safe_torch_load
from vlm_train.parallel.signals import fault_point
from vlm_train.training.config_dump import config_yaml
from vlm_train.training.connector_files import write_connector_files
from vlm_train.training.frozen import FROZEN_FILE, check_frozen_weights, frozen_fingerprint
from vlm_train.training.publish import LATEST, PARTIAL, prune, publish


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoint_root(run_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def save(engine: TrainEngine, run_dir: Path, step: int, trainer_state: dict[str, Any], cfg: Config) -> Path:
    """Collective: every rank writes into step_<N>.partial, then rank 0 publishes it and prunes."""
    tag = f"step_{step}"
    root = checkpoint_root(run_dir)
    partial = root / f"{tag}{PARTIAL}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left behind by a save that was killed
    dist.barrier()
    frozen = frozen_fingerprint(engine, cfg)  # collective under ZeRO-3 (gathers each frozen parameter)
    engine.save(root, partial.name)
    partial.mkdir(parents=True, exist_ok=True)  # ranks the engine gave nothing to write
    write_atomic(partial / f"trainer_rank{rank:05d}.pt", lambda f: torch.save(trainer_state, f))
    if rank == 0:
        write_atomic(partial / "config.yaml", lambda f: f.write(config_yaml(cfg).encode()))
        write_atomic(partial / FROZEN_FILE, lambda f: f.write(json.dumps(frozen, indent=1).encode()))
    fault_point("save", step, rank, run_dir)  # tests stop a rank here: shards written, `latest` not moved
    dist.barrier()
    if rank == 0:
        _check_complete(partial, world=dist.get_world_size())
        publish(root, partial, tag)
        prune(root, keep=cfg.train.keep_last)
    # <run.dir>/connector.safetensors (+ LLaVA's mm_projector.bin): the newest published connector
    write_connector_files(engine, run_dir, step, cfg)  # collective (gathers under ZeRO-3)
    dist.barrier()
    return root / tag


def _check_complete(partial: Path, world: int) -> None:
    """Every rank's files are there; else the folder is not published."""
    expected = ["config.yaml", FROZEN_FILE, *(f"trainer_rank{r:05d}.pt" for r in range(world))]
    missing = [name for name in expected if not (partial / name).is_file()]
    if missing or not has_engine_state(partial):
        raise RuntimeError(f"checkpoint {partial} is incomplete (missing {missing or 'model states'}); not published")


def load(engine: TrainEngine, folder: Path, cfg: Config | None = None) -> dict[str, Any]:
    """Restore the engine from `folder` and return this rank's trainer state.

    Every file is read with weights_only=True; the frozen weights the model was rebuilt with must
    match the checksum the checkpoint recorded. A checkpoint of another rank count or ZeRO stage
    is resharded by the engine.
    """
    check_frozen_weights(engine, folder, cfg)
    saved_ranks = len(list(folder.glob("trainer_rank*.pt")))
    engine.load(folder, saved_ranks=saved_ranks, saved_stage=_saved_zero_stage(folder))
    trainer_file = folder / f"trainer_rank{dist.get_rank():05d}.pt"
    if not trainer_file.is_file():  # fewer ranks than before: the step, counters and data position are global
        trainer_file = folder / "trainer_rank00000.pt"
    return safe_torch_load(trainer_file)


def _saved_zero_stage(folder: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.select(OmegaConf.load(folder / "config.yaml"), "parallel.zero_stage"))


def load_trained_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a consolidated state dict into a freshly built model; only frozen parameters may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    not_frozen = [name for name in missing if name not in frozen and name not in buffers]
    if not_frozen or unexpected:
        raise ConfigError(
            f"checkpoint does not fit the model: missing {not_frozen[:5]}, unexpected {list(unexpected)[:5]}"
        )
