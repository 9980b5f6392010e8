"""DeepSpeed's side of checkpoints: safe loading, resharding through universal checkpoints,
consolidated fp32 weights, and whole tensors out of ZeRO-partitioned parameters.

Everything here knows DeepSpeed's file layout or calls into DeepSpeed; the framework-neutral
parts (atomic publish, trainer state, frozen-weight checks) are in vlm_train/training/.

Loading never unpickles arbitrary objects: every file, DeepSpeed's included, is read with
`torch.load(weights_only=True)` plus an allow-list of DeepSpeed's three plain data classes
(`safe_torch_load`; `guard_loads` routes DeepSpeed's own reads through it).
"""

from __future__ import annotations

import pickle
import shutil
from functools import partial
from pathlib import Path
from typing import Any

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
