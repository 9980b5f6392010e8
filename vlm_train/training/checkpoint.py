"""Checkpoints: the engine's state plus our trainer state, checksummed and published atomically.

    <run.dir>/checkpoints/step_<N>/       engine state (ZeRO-partitioned, frozen parameters left
                                          out; parallel/engine_checkpoint.py), trainer_rank<R>.pt
                                          (step, data position, RNG) per rank, config.yaml,
                                          frozen.json, SHA256SUMS.rank<R> per rank (checksums.py)
    <run.dir>/checkpoints/latest          names the newest COMPLETE step folder

A save writes into `step_<N>.partial/`: each rank writes its files (hashed as written, fsynced)
and its manifest; only when every rank's files are durable does rank 0 check the folder and
publish it (publish.py: rename into place, then move `latest`). With `train.async_save` the
writing happens in a background thread after a snapshot (async_save.py) and the trainer's
per-step all-reduce says when every rank is done (`Checkpointer`). On resume every file is
checked against its checksum; a damaged checkpoint is skipped for the previous complete one
(`resume_checkpoint`). Frozen weights are rebuilt on resume and checked against `frozen.json`
(frozen.py). Every file is read with `torch.load(weights_only=True)` (`safe_torch_load`).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlm_train.config import Config
from vlm_train.errors import ConfigError
from vlm_train.parallel.engine import TrainEngine
from vlm_train.parallel.engine_checkpoint import HostBuffers, PendingFile, has_engine_state, safe_torch_load
from vlm_train.parallel.signals import fault_point
from vlm_train.training import checksums
from vlm_train.training.async_save import BackgroundWriter, write_rank_files
from vlm_train.training.config_dump import config_yaml
from vlm_train.training.connector_files import gather_connector, write_connector_state
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


@dataclass
class _Save:
    """A save whose files are written (or being written) but not yet published."""

    step: int
    partial: Path
    connector: dict[str, torch.Tensor] | None  # the connector files' state at `step` (rank 0)
    started: float  # time.perf_counter() when the save began, for how long saves take


class Checkpointer:
    """Saves a run's checkpoints, synchronously or (`train.async_save`) overlapping training.

    Synchronous: `save` returns once the checkpoint is published. Async: `save` returns after the
    snapshot (tensors copied to host memory, trainer state serialised); the trainer then reports
    `writing_here()` in its per-step all-reduce and calls `publish_if_durable` with the sum, so
    that rank 0 publishes in the main thread as soon as every rank's files are durable. `finish()`
    (collective) waits for the write and publishes: before the next save (one in flight at most),
    at the end of training and before a preemption stop.
    """

    def __init__(self, engine: TrainEngine, run_dir: Path, cfg: Config, async_save: bool | None = None):
        self.engine, self.run_dir, self.cfg = engine, run_dir, cfg
        self.root = checkpoint_root(run_dir)
        self.async_save = cfg.train.async_save if async_save is None else async_save
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer = BackgroundWriter()
        self.buffers = HostBuffers() if self.async_save else None  # reused by every snapshot of the run
        self.pending: _Save | None = None
        self.config_yaml = config_yaml(cfg).encode()  # the same for every save of the run (~40 ms to make)
        self.longest_save_s = 0.0  # from the start of a save to its publication (async: durable everywhere)

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: checkpoint `step`; returns the folder it is (or will be) published as."""
        self.finish()
        save, files = self._snapshot(step, trainer_state)
        write = partial(write_rank_files, save.partial, files, self.rank, self._fault(step))
        if self.async_save:
            self.writer.start(write, save.partial.name)
            self.pending = save
            fault_point("save", step, self.rank, self.run_dir)  # tests stop a rank here: snapshot taken
        else:
            write()
            fault_point("save", step, self.rank, self.run_dir)  # tests stop a rank here: files written, not published
            dist.barrier()
            self._publish(save)
            dist.barrier()
            self._took(save)
        return self.root / f"step_{step}"

    def writing_here(self) -> float:
        """1.0 while this rank's files of the pending save are not durable yet (the trainer sums it
        over ranks every step); raises what the background writer raised."""
        return float(self.pending is not None and not self.writer.durable())

    def publish_if_durable(self, writing_everywhere: float) -> None:
        """After a step whose all-reduce counted `writing_everywhere` ranks still writing: publish
        the pending save when that is none (every rank sees the same sum, so all agree)."""
        if self.pending is not None and writing_everywhere == 0:
            self.writer.wait()
            save, self.pending = self.pending, None
            self._publish(save)
            self._took(save)

    def finish(self) -> None:
        """Collective: wait for the pending save's files on every rank, then publish it."""
        if self.pending is None:
            return
        self.writer.wait()
        dist.barrier()  # every rank's files are durable
        save, self.pending = self.pending, None
        self._publish(save)
        self._took(save)

    def _took(self, save: _Save) -> None:
        self.longest_save_s = max(self.longest_save_s, time.perf_counter() - save.started)

    def _snapshot(self, step: int, trainer_state: dict[str, Any]) -> tuple[_Save, list[PendingFile]]:
        """Collective, the part of a save that blocks training: this rank's files, still to write."""
        started = time.perf_counter()
        partial_dir = self.root / f"step_{step}{PARTIAL}"
        if self.rank == 0:
            shutil.rmtree(partial_dir, ignore_errors=True)  # left behind by a save that was killed
        dist.barrier()
        frozen = frozen_fingerprint(self.engine, self.cfg)  # collective under ZeRO-3 (first save only)
        connector = gather_connector(self.engine, self.cfg)  # collective under ZeRO-3; a CPU copy
        files = self.engine.save(self.root, partial_dir.name, snapshot=self.buffers)  # async: a copy
        partial_dir.mkdir(parents=True, exist_ok=True)  # ranks the engine gave nothing to write
        files.append(_bytes_file(partial_dir / f"trainer_rank{self.rank:05d}.pt", _torch_bytes(trainer_state)))
        if self.rank == 0:
            files.append(_bytes_file(partial_dir / "config.yaml", self.config_yaml))
            files.append(_bytes_file(partial_dir / FROZEN_FILE, json.dumps(frozen, indent=1).encode()))
        return _Save(step, partial_dir, connector if self.rank == 0 else None, started), files

    def _fault(self, step: int):
        return lambda point: fault_point(point, step, self.rank, self.run_dir)

    def _publish(self, save: _Save) -> None:
        """Rank 0: check the folder, rename it into place, move `latest`, prune, connector files."""
        if self.rank != 0:
            return
        _check_complete(save.partial, self.world)
        publish(self.root, save.partial, f"step_{save.step}")
        prune(self.root, keep=self.cfg.train.keep_last)
        # <run.dir>/connector.safetensors (+ LLaVA's mm_projector.bin): the newest published connector
        if save.connector is not None:
            write_connector_state(save.connector, self.run_dir, save.step, self.cfg)
        print(f"saved checkpoint {self.root / f'step_{save.step}'}", flush=True)


def save(engine: TrainEngine, run_dir: Path, step: int, trainer_state: dict[str, Any], cfg: Config) -> Path:
    """Collective: a synchronous save of `step`, published when it returns (benchmarks, tools)."""
    return Checkpointer(engine, run_dir, cfg, async_save=False).save(step, trainer_state)


def _torch_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _bytes_file(path: Path, data: bytes) -> PendingFile:
    return PendingFile(path, lambda f: f.write(data))


def _check_complete(partial: Path, world: int) -> None:
    """Every rank's files and checksum list are there and every file is listed; else the folder
    is not published."""
    per_rank = [name for r in range(world) for name in (f"trainer_rank{r:05d}.pt", checksums.manifest_name(r))]
    missing = [name for name in ["config.yaml", FROZEN_FILE, *per_rank] if not (partial / name).is_file()]
    if missing or not has_engine_state(partial):
        raise RuntimeError(f"checkpoint {partial} is incomplete (missing {missing or 'model states'}); not published")
    listed = checksums.read_manifests(partial) or {}
    unlisted = [p.name for p in partial.iterdir() if p.name not in listed and checksums.MANIFEST_PREFIX not in p.name]
    if unlisted:
        raise RuntimeError(f"checkpoint {partial}: {unlisted} are in no checksum list; not published")


# --- resume: the newest checkpoint whose every file checks out ------------------------------------


class NoUsableCheckpoint(ConfigError):
    """Every checkpoint of the run dir is damaged."""

    same_on_every_rank = True


def resume_checkpoint(run_dir: Path) -> Path | None:
    """Collective: the checkpoint to resume from, None when the run has none.

    The folder `latest` names when every file of it matches its checksum; else the newest older
    complete one that does (one warning line names what was wrong and which checkpoint is used).
    Ranks share the reading and agree on the outcome; none good is a one-line error.
    """
    candidates = _candidates(checkpoint_root(run_dir))
    rejected: list[str] = []
    for folder in candidates:
        problem = _agreed_problem(folder)
        if problem is None:
            if rejected and dist.get_rank() == 0:
                print(
                    f"vlm-train: warning: {'; '.join(rejected)}: resuming from {folder.name} instead", file=sys.stderr
                )
            return folder
        rejected.append(f"checkpoint {folder.name}: {problem}")
    if rejected:
        raise NoUsableCheckpoint(
            f"{'; '.join(rejected)}: no complete checkpoint is left in {checkpoint_root(run_dir)} "
            "(move the folder away to start the run over)"
        )
    return None


def _candidates(root: Path) -> list[Path]:
    """The folder `latest` names, then the published step folders before it, newest first. Folders
    after it (renamed by a save killed before `latest` moved) were never published."""
    pointer = root / LATEST
    if not pointer.is_file():
        return []
    named = pointer.read_text().strip()
    newest = _step_of(named)
    older = [p for p in root.glob("step_*") if (step := _step_of(p.name)) is not None and newest and step < newest]
    return [root / named, *sorted(older, key=lambda p: -(_step_of(p.name) or 0))]


def _step_of(name: str) -> int | None:
    number = name.removeprefix("step_")
    return int(number) if name.startswith("step_") and number.isdigit() else None


def _agreed_problem(folder: Path) -> str | None:
    """Collective: what is wrong with `folder` (the first problem by file name), the same on every
    rank, or None. Each rank re-hashes its share of the files."""
    mine = _problems_here(folder)
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    found = sorted({problem for problems in everyone for problem in problems})
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def _problems_here(folder: Path) -> list[str]:
    if not folder.is_dir():
        return ["the folder is missing"]
    try:
        digests = checksums.read_manifests(folder)
    except (OSError, ValueError) as err:
        return [f"its checksum list cannot be read ({err})"]
    if digests is None:  # written before checkpoints carried checksums
        if dist.get_rank() == 0:
            print(
                f"vlm-train: warning: checkpoint {folder.name} has no checksums (an older vlm_train wrote it): "
                "loading it unverified",
                file=sys.stderr,
            )
        return []
    structural = checksums.structure_problems(folder, digests)
    if structural:
        return structural
    share = checksums.share_of_work(folder, sorted(digests), dist.get_rank(), dist.get_world_size())
    return checksums.problems(folder, share, digests)


# --- load ---------------------------------------------------------------------------------------


def load(engine: TrainEngine, folder: Path, cfg: Config | None = None) -> dict[str, Any]:
    """Restore the engine from `folder` and return this rank's trainer state.

    Every file is read with weights_only=True; the frozen weights the model was rebuilt with must
    match the checksum the checkpoint recorded. A checkpoint of another rank count or ZeRO stage
    is resharded by the engine. (Checksums are checked before, when `resume_checkpoint` picks it.)
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
