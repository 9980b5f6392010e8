"""DeepSpeed's side of checkpoints: safe loading, resharding through universal checkpoints,
consolidated fp32 weights, and whole tensors out of ZeRO-partitioned parameters.

Everything here knows DeepSpeed's file layout or calls into DeepSpeed; the framework-neutral
parts (atomic publish, trainer state, frozen-weight checks) are in vlm_train/training/.

Loading never unpickles arbitrary objects: every file, DeepSpeed's included, is read with
`torch.load(weights_only=True)` plus an allow-list of DeepSpeed's three plain data classes
(`safe_torch_load`; `guard_loads` routes DeepSpeed's own reads through it).

Saving never lets DeepSpeed write: `capture_save` runs its `save_checkpoint` (collectives and
all) with a checkpoint engine that keeps what it is handed, and returns the files still to write,
which the checkpointer writes (hashed, fsynced) now or in a background thread.
"""

from __future__ import annotations

import copy
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from vlm_train.errors import ConfigError
from vlm_train.files import write_atomic


def safe_globals() -> list:
    # The only non-tensor, non-container objects DeepSpeed 0.19 pickles into its ZeRO optimizer
    # states (checked for stages 0-3, fp32 and bf16): an enum, a dataclass and a plain class
    # whose attributes are numbers. None of them runs code when rebuilt.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_torch_load(path: Path | str, map_location: str | torch.device | None = None) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's plain classes allowed; anything else is refused."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            needs = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a zip checkpoint: the unpickler's message is all there is
            needs = str(err).splitlines()[-1][:200]
        raise ConfigError(
            f"refusing to load {path}: it needs unpickling of {needs}, which could run arbitrary code "
            "(vlm_train loads tensors, containers and numbers only); use a checkpoint you wrote yourself"
        ) from None


def guard_loads(engine: Any) -> None:
    """Make every file DeepSpeed's load_checkpoint reads go through `safe_torch_load`."""
    # DeepSpeed reads model, optimizer and ZeRO files through engine.checkpoint_engine.load,
    # whose torch engine calls torch.load(weights_only=False).
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)


@dataclass(frozen=True)
class PendingFile:
    """A checkpoint file not yet written: `write(f)` writes its bytes to an open binary file."""

    path: Path
    write: Callable[[IO[bytes]], object]


class _CapturingEngine:
    """Stands in for DeepSpeed's checkpoint engine during one `save_checkpoint`: each state dict
    DeepSpeed hands it is kept, as a `snapshot` or as it is, instead of written. Everything else
    (makedirs, create, commit, load) is the original engine's."""

    def __init__(self, original: Any, buffers: HostBuffers | None):
        self._original, self._buffers = original, buffers
        self.files: list[PendingFile] = []

    def save(self, state_dict: Any, path: str) -> None:
        state = state_dict if self._buffers is None else snapshot(state_dict, self._buffers)
        zipfile = getattr(self._original, "zipfile_serialization", True)
        self.files.append(PendingFile(Path(path), partial(_torch_save, state, zipfile=zipfile)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _torch_save(state: Any, f: IO[bytes], zipfile: bool) -> None:
    torch.save(state, f, _use_new_zipfile_serialization=zipfile)


def capture_save(engine: Any, root: Path, tag: str, snapshot_into: HostBuffers | None) -> list[PendingFile]:
    """Collective: DeepSpeed's save_checkpoint into root/tag (frozen parameters left out), its files
    returned unwritten. With `snapshot_into` every tensor is first copied into those host buffers,
    so that training may go on (and change the weights) while the files are written."""
    if snapshot_into is not None:
        snapshot_into.recycle()
    capturing = _CapturingEngine(engine.checkpoint_engine, snapshot_into)
    original, engine.checkpoint_engine = engine.checkpoint_engine, capturing
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    finally:
        engine.checkpoint_engine = original
    return capturing.files


class HostBuffers:
    """Host memory that snapshots are copied into, kept from one save to the next: allocating it
    anew (first-touch page faults; on GPUs, pinning) costs more than the copy itself. `recycle()`
    (at the start of a snapshot) hands the previous snapshot's buffers out again, so its files
    must be written by then: the checkpointer keeps one save in flight."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}
        self._used: list[torch.UntypedStorage] = []

    def recycle(self) -> None:
        for storage in self._used:
            self._free.setdefault((storage.nbytes(), storage.is_pinned()), []).append(storage)
        self._used = []

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        free = self._free.get((nbytes, pinned))
        storage = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self._used.append(storage)
        return storage


def snapshot(state: Any, buffers: HostBuffers) -> Any:
    """A copy of `state` that later training cannot change, which torch.save writes to the same
    bytes: every tensor copied into host memory (tensors sharing a storage keep sharing one copy
    of it, as torch.save would write them; requires_grad and Parameter kept), every other object
    deep-copied (optimizer bookkeeping, LR-scheduler state, DeepSpeed's config)."""
    memo: dict[int, Any] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in _tensors(state, set()):
        if id(tensor) not in memo:
            memo[id(tensor)] = _host_copy(tensor, storages, buffers)
    if any(storage.is_pinned() for storage in storages.values()):
        torch.cuda.synchronize()  # the copies into pinned memory were asynchronous
    return copy.deepcopy(state, memo)  # finds every tensor in `memo`


def _tensors(state: Any, seen: set[int]):
    """Every tensor inside containers and plain objects' attributes."""
    if id(state) in seen:
        return
    seen.add(id(state))
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value, seen)
    elif isinstance(state, (list, tuple, set)):
        for value in state:
            yield from _tensors(value, seen)
    elif hasattr(state, "__dict__") and not isinstance(state, type):
        yield from _tensors(vars(state), seen)


def _host_copy(tensor: torch.Tensor, storages: dict[int, torch.UntypedStorage], buffers: HostBuffers) -> torch.Tensor:
    """`tensor` viewing a host copy of its storage (one copy per storage, keyed as torch.save keys them)."""
    storage = tensor.untyped_storage()
    if storage._cdata not in storages:
        on_device = storage.device.type != "cpu"
        host = buffers.take(storage.nbytes(), pinned=on_device)
        storages[storage._cdata] = host.copy_(storage, non_blocking=on_device)
    host = storages[storage._cdata]
    view = torch.empty(0, dtype=tensor.dtype).set_(host, tensor.storage_offset(), tensor.size(), tensor.stride())
    view.requires_grad_(tensor.requires_grad)
    if isinstance(tensor, torch.nn.Parameter):
        view = torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
    if vars(tensor):  # attributes torch.save writes along (none in DeepSpeed 0.19's states)
        vars(view).update(copy.deepcopy(vars(tensor)))
    return view


def verify_folder(folder: Path) -> None:
    """Read every .pt file of a checkpoint safely (before a tool that uses plain torch.load opens them)."""
    for path in sorted(folder.glob("*.pt")):
        safe_torch_load(path)


def has_engine_state(folder: Path) -> bool:
    """Whether DeepSpeed's model states are in `folder` (a save that got that far)."""
    return any(folder.glob("*model_states.pt"))


def load_resharded(engine: Any, folder: Path, saved_ranks: int, saved_stage: int) -> Any:
    """Load a checkpoint written by another number of ranks or ZeRO stage through DeepSpeed's
    universal format (weights and Adam moments per parameter, whole): rank 0 converts it once
    into checkpoints/universal/step_<N>, every rank then takes its own partition of it.
    Returns DeepSpeed's client state (None when it found nothing to load)."""
    stage = engine.zero_optimization_stage()
    if saved_stage not in (1, 2, 3) or stage not in (1, 2):
        # ZeRO 0 has no partitioned optimizer state to convert; DeepSpeed 0.19 loads universal
        # checkpoints into ZeRO 1 and 2 only.
        raise ConfigError(
            f"{folder.name} was saved by {saved_ranks} ranks at ZeRO {saved_stage}; this run has "
            f"{dist.get_world_size()} ranks at ZeRO {stage}: resharding needs ZeRO 1, 2 or 3 before and "
            "ZeRO 1 or 2 after (resume with the original ranks and stage)"
        )
    universal = folder.parent / "universal" / folder.name
    if dist.get_rank() == 0 and not (universal / "zero").is_dir():
        verify_folder(folder)  # the converter reads with torch.load(weights_only=False)
        _convert_to_universal(folder, universal)
    dist.barrier()
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads this flag at load time only
    try:
        _, client = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_module_strict=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if dist.get_rank() == 0:
        print(
            f"resharded {folder.name}: {saved_ranks} ranks ZeRO {saved_stage} -> {dist.get_world_size()} ranks ZeRO {stage}"
        )
    return client


def _convert_to_universal(folder: Path, universal: Path) -> None:
    import subprocess
    import sys

    shutil.rmtree(universal, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        f"--input_folder={folder}",
        f"--output_folder={universal}",
        "--num_extract_workers=1",
        "--num_merge_workers=1",
        "--inject_missing_state",  # our engine does not record DeepSpeed's optional universal info
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {folder} to a universal checkpoint failed:\n{result.stderr[-3000:]}")
    _stamp_deepspeed_version(universal / "zero" / "optimizer_state.pt")
    _adapt_zero3_universal(folder, universal)


def _adapt_zero3_universal(folder: Path, universal: Path) -> None:
    """DeepSpeed 0.19 converts a ZeRO-3 checkpoint into a layout its own ZeRO 1/2 universal loader
    cannot read: per-rank model-state files with empty partitions and bare flat tensors per
    parameter. Write what the loader reads: `mp_rank_00_model_states.pt` with the whole fp32
    weights, each zero/<name>/<state>.pt as {"param": tensor shaped like the parameter}, and the
    Adam step count it leaves out (zero/<name>/step.pt, from the ZeRO-3 optimizer state)."""
    target = universal / "mp_rank_00_model_states.pt"
    source = universal / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if target.exists() or not source.exists():
        return
    states = safe_torch_load(source)
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    optimizer = safe_torch_load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    adam_steps = {float(group["step"]) for group in optimizer["optimizer_state_dict"]["state"].values()}
    if len(adam_steps) != 1:
        raise ConfigError(f"{folder.name}: parameter groups at different Adam steps cannot be resharded")
    step = torch.tensor(adam_steps.pop())
    for name, shape in shapes.items():
        if not (universal / "zero" / name).is_dir():
            continue  # frozen: not in the checkpoint
        for path in (universal / "zero" / name).glob("*.pt"):
            value = safe_torch_load(path)
            if isinstance(value, torch.Tensor) and path.stem != "step":
                write_atomic(path, partial(torch.save, {"param": value.reshape(shape)}))
        write_atomic(universal / "zero" / name / "step.pt", lambda f: torch.save(step, f))
    states["module"] = {
        name: safe_torch_load(universal / "zero" / name / "fp32.pt")["param"]
        for name in shapes
        if (universal / "zero" / name / "fp32.pt").is_file()
    }
    write_atomic(target, lambda f: torch.save(states, f))


def _stamp_deepspeed_version(optimizer_state: Path) -> None:
    """DeepSpeed 0.19 converts ZeRO-3 checkpoints without the `ds_version` its ZeRO 1/2 universal
    loader asserts on; the converter that just wrote the file is this DeepSpeed."""
    import deepspeed

    state = safe_torch_load(optimizer_state)
    if not state.get("ds_version"):
        state["ds_version"] = deepspeed.__version__
        write_atomic(optimizer_state, lambda f: torch.save(state, f))


def consolidated_state_dict(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trained model's fp32 weights from one checkpoint folder, whatever the ZeRO stage.

    Frozen parameters are not in checkpoints (docs/checkpointing.md); load the result with
    `training.checkpoint.load_trained_weights`, which checks that only frozen ones are missing.
    """
    verify_folder(folder)  # DeepSpeed's zero_to_fp32 below uses torch.load(weights_only=False)
    if zero_stage == 0:
        states = safe_torch_load(folder / "mp_rank_00_model_states.pt")
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def full_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter as this rank's module holds it (collective under ZeRO-3)."""
    if not hasattr(param, "ds_id"):
        return param.data
    # ZeRO-3 keeps a shard per rank: gather one parameter at a time (collective) to bound memory.
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([param]):
        return param.data.clone()


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The trained fp32 value of a parameter on CPU: the optimizer's fp32 master copy when it keeps
    one (bf16 training, ZeRO 1-3), assembled across ranks, else the parameter gathered (collective
    under ZeRO 1-3)."""
    if param.requires_grad and (hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master.detach().float().cpu().clone()
    if hasattr(param, "ds_id"):  # ZeRO-3 partition without a master copy (a frozen connector)
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    return param.detach().float().cpu().clone()
