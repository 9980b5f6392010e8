"""Checkpoints: DeepSpeed engine state plus our trainer state, published atomically.

    <run.dir>/checkpoints/step_<N>/       engine state (DeepSpeed layout, ZeRO-partitioned, frozen
                                          parameters left out), trainer_rank<R>.pt (step, data
                                          position, RNG) per rank, config.yaml, frozen.json
    <run.dir>/checkpoints/latest          names the newest COMPLETE step folder

A save writes into `step_<N>.partial/`; only when every rank has written its files does rank 0
check the folder, rename it to `step_<N>` and then replace `latest` (both atomic renames), so a
crash or SIGKILL at any moment of a save leaves `latest` naming a complete checkpoint.

Frozen pretrained weights (a frozen tower or LLM) are not rewritten into every checkpoint: they
are rebuilt from their source (`vision.path`, `llm.path` or the run's seed) on resume, and
`frozen.json` holds their SHA-256 so that a changed source is refused instead of silently
training a different model.

Loading never unpickles arbitrary objects: every file, DeepSpeed's included, is read with
`torch.load(weights_only=True)` plus an allow-list of DeepSpeed's three plain data classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlm_train.config import Config, to_yaml
from vlm_train.errors import ConfigError
from vlm_train.training.connector_files import write_connector_files
from vlm_train.training.signals import fault_point

LATEST = "latest"
PARTIAL = ".partial"  # suffix of a folder still being written
FROZEN_FILE = "frozen.json"


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
    """Collective: every rank writes into step_<N>.partial, then rank 0 publishes it and prunes."""
    tag = f"step_{step}"
    root = checkpoint_root(run_dir)
    partial = root / f"{tag}{PARTIAL}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left behind by a save that was killed
    dist.barrier()
    frozen = frozen_fingerprint(engine, cfg)  # collective under ZeRO-3 (gathers each frozen parameter)
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False, exclude_frozen_parameters=True)
    partial.mkdir(parents=True, exist_ok=True)  # ranks that DeepSpeed gave nothing to write
    _write_atomic(partial / f"trainer_rank{rank:05d}.pt", lambda f: torch.save(trainer_state, f))
    if rank == 0:
        _write_atomic(partial / "config.yaml", lambda f: f.write(redact_secrets(to_yaml(cfg)).encode()))
        _write_atomic(partial / FROZEN_FILE, lambda f: f.write(json.dumps(frozen, indent=1).encode()))
    fault_point("save", step, rank, run_dir)  # tests stop a rank here: shards written, `latest` not moved
    dist.barrier()
    if rank == 0:
        _publish(root, partial, tag, world=dist.get_world_size())
        prune(root, keep=cfg.train.keep_last)
    # <run.dir>/connector.safetensors (+ LLaVA's mm_projector.bin): the newest published connector
    write_connector_files(engine, run_dir, step, cfg)  # collective (gathers under ZeRO-3)
    dist.barrier()
    return root / tag


def _publish(root: Path, partial: Path, tag: str, world: int) -> None:
    """Check that every rank's files are there, rename the folder into place, then move `latest`."""
    expected = ["config.yaml", FROZEN_FILE, *(f"trainer_rank{r:05d}.pt" for r in range(world))]
    missing = [name for name in expected if not (partial / name).is_file()]
    if missing or not any(partial.glob("*model_states.pt")):
        raise RuntimeError(f"checkpoint {partial} is incomplete (missing {missing or 'model states'}); not published")
    final = root / tag
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, lambda f: f.write(tag.encode()))
    _fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step folders (never the one `latest` names) and stale partials."""
    latest = (root / LATEST).read_text().strip()
    for stale in root.glob(f"step_*{PARTIAL}"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted(
        (p for p in root.glob("step_*") if p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1])
    )
    for folder in steps[:-keep]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


def load(engine, folder: Path, cfg: Config | None = None) -> dict:
    """Restore the engine from `folder` and return this rank's trainer state.

    Every file is read with weights_only=True; the frozen weights the model was rebuilt with must
    match the checksum the checkpoint recorded.
    """
    guard_deepspeed_loads(engine)
    check_frozen_weights(engine, folder, cfg)
    saved_ranks = len(list(folder.glob("trainer_rank*.pt")))
    saved_stage = _saved_zero_stage(folder)
    if (saved_ranks, saved_stage) == (dist.get_world_size(), engine.zero_optimization_stage()):
        # Frozen parameters are not in the checkpoint (see module docstring): the rebuilt ones stay.
        _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    else:
        client = _load_resharded(engine, folder, saved_ranks, saved_stage)
    if client is None:
        raise ConfigError(f"{folder} could not be loaded by DeepSpeed: is it a vlm_train checkpoint?")
    trainer_file = folder / f"trainer_rank{dist.get_rank():05d}.pt"
    if not trainer_file.is_file():  # fewer ranks than before: the step, counters and data position are global
        trainer_file = folder / "trainer_rank00000.pt"
    return safe_torch_load(trainer_file)


def _saved_zero_stage(folder: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.select(OmegaConf.load(folder / "config.yaml"), "parallel.zero_stage"))


def _load_resharded(engine, folder: Path, saved_ranks: int, saved_stage: int):
    """Load a checkpoint written by another number of ranks or ZeRO stage through DeepSpeed's
    universal format (weights and Adam moments per parameter, whole): rank 0 converts it once
    into checkpoints/universal/step_<N>, every rank then takes its own partition of it."""
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
                _write_atomic(path, lambda f, v=value, s=shape: torch.save({"param": v.reshape(s)}, f))
        _write_atomic(universal / "zero" / name / "step.pt", lambda f: torch.save(step, f))
    states["module"] = {
        name: safe_torch_load(universal / "zero" / name / "fp32.pt")["param"]
        for name in shapes
        if (universal / "zero" / name / "fp32.pt").is_file()
    }
    _write_atomic(target, lambda f: torch.save(states, f))


def _stamp_deepspeed_version(optimizer_state: Path) -> None:
    """DeepSpeed 0.19 converts ZeRO-3 checkpoints without the `ds_version` its ZeRO 1/2 universal
    loader asserts on; the converter that just wrote the file is this DeepSpeed."""
    import deepspeed

    state = safe_torch_load(optimizer_state)
    if not state.get("ds_version"):
        state["ds_version"] = deepspeed.__version__
        _write_atomic(optimizer_state, lambda f: torch.save(state, f))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# What must match for a checkpoint to resume: the model, the TP sharding and the data layout.
# The data-parallel size and the ZeRO stage (1-3) may change: see `load` (universal checkpoints).
RESUME_KEYS = (
    "vision",
    "llm",
    "connector",
    "parallel.tensor_parallel",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    "data.urls",
    "data.num_workers",
)
# With train.global_batch_size set, micro-batch and accumulation are derived from the number of
# ranks: a resume on another data-parallel size keeps the global batch, not these.
DERIVED_WITH_GLOBAL_BATCH = ("train.micro_batch_size", "train.grad_accum")


def check_resumable(saved_yaml: str, cfg: Config, folder: Path) -> None:
    """A clear error when the run dir's checkpoint belongs to an incompatible config."""
    from omegaconf import OmegaConf

    saved = OmegaConf.create(saved_yaml)
    current = OmegaConf.structured(cfg)
    differences = []
    fixed_global = current.train.global_batch_size is not None and saved.train.get("global_batch_size") is not None
    for key in RESUME_KEYS:
        if fixed_global and key in DERIVED_WITH_GLOBAL_BATCH:
            continue
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


def _deepspeed_safe_globals() -> list:
    # The only non-tensor, non-container objects DeepSpeed 0.19 pickles into its ZeRO optimizer
    # states (checked for stages 0-3, fp32 and bf16): an enum, a dataclass and a plain class
    # whose attributes are numbers. None of them runs code when rebuilt.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_torch_load(path: Path | str, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's plain classes allowed; anything else is refused."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
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


def guard_deepspeed_loads(engine) -> None:
    """Make every file DeepSpeed's load_checkpoint reads go through `safe_torch_load`."""
    # DeepSpeed reads model, optimizer and ZeRO files through engine.checkpoint_engine.load,
    # whose torch engine calls torch.load(weights_only=False).
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)


def verify_folder(folder: Path) -> None:
    """Read every .pt file of a checkpoint safely (before a tool that uses plain torch.load opens them)."""
    for path in sorted(folder.glob("*.pt")):
        safe_torch_load(path)


def frozen_fingerprint(engine, cfg: Config | None = None) -> dict:
    """Count, size and SHA-256 of the frozen parameters, plus where they come from."""
    # Computed once per engine: frozen weights never change while training.
    if not hasattr(engine, "vlm_frozen_digest"):
        engine.vlm_frozen_digest = _across_tensor_parallel(frozen_digest(engine.module), getattr(engine, "mpu", None))
    fingerprint = dict(engine.vlm_frozen_digest)
    if cfg is not None:
        fingerprint["source"] = {
            "vision.path": cfg.vision.path,
            "llm.path": cfg.llm.path,
            "connector.path": cfg.connector.path,
            "run.seed": cfg.run.seed,  # random initialisation when a path is null
        }
    return fingerprint


def _across_tensor_parallel(digest: dict, mpu) -> dict:
    """Under tensor parallelism each rank holds its own shards of a frozen decoder: one digest over
    the TP group's digests (in TP-rank order), the same on every rank whatever the DP size."""
    if mpu is None or mpu.get_model_parallel_world_size() == 1:
        return digest
    digests: list = [None] * mpu.get_model_parallel_world_size()
    dist.all_gather_object(digests, digest, group=mpu.get_model_parallel_group())
    combined = hashlib.sha256("".join(d["sha256"] for d in digests).encode()).hexdigest()
    return {
        "parameters": sum(d["parameters"] for d in digests),
        "numel": sum(d["numel"] for d in digests),
        "sha256": combined,
        "tensor_parallel": len(digests),
    }


def frozen_digest(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """SHA-256 over the names and bytes of `module`'s frozen parameters (cast to `dtype` if given)."""
    digest, count, numel = hashlib.sha256(), 0, 0
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        tensor = _full_tensor(param).detach().cpu()
        tensor = tensor.to(dtype) if dtype is not None else tensor
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        count, numel = count + 1, numel + tensor.numel()
    return {"parameters": count, "numel": numel, "sha256": digest.hexdigest()}


def _full_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    if not hasattr(param, "ds_id"):
        return param.data
    # ZeRO-3 keeps a shard per rank: gather one parameter at a time (collective) to bound memory.
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([param]):
        return param.data.clone()


def check_frozen_weights(engine, folder: Path, cfg: Config | None = None) -> None:
    """A clear error when the rebuilt frozen weights are not those the checkpoint trained with."""
    recorded_file = folder / FROZEN_FILE
    if not recorded_file.is_file():
        return  # written before frozen weights were left out: they are in the engine files
    recorded = json.loads(recorded_file.read_text())
    current = frozen_fingerprint(engine, cfg)
    if (recorded["parameters"], recorded["sha256"]) != (current["parameters"], current["sha256"]):
        raise ConfigError(
            f"the frozen weights differ from those {folder.name} was trained with "
            f"({recorded['parameters']} frozen tensors, sha256 {recorded['sha256'][:12]}, from "
            f"{recorded.get('source')}; now {current['parameters']}, {current['sha256'][:12]}): "
            "point vision.path/llm.path at the original weights"
        )


def check_rebuilt_frozen_weights(model: torch.nn.Module, folder: Path) -> None:
    """Outside training (export): the rebuilt model's frozen weights are those of the checkpoint."""
    recorded_file = folder / FROZEN_FILE
    if not recorded_file.is_file():
        return
    recorded_fingerprint = json.loads(recorded_file.read_text())
    if recorded_fingerprint.get("tensor_parallel", 1) > 1:
        return  # a digest of TP shards: the rebuilt (whole) model cannot reproduce it; resume checks it
    recorded = recorded_fingerprint["sha256"]
    # The engine held them in the run's precision: fp32, or bf16 under DeepSpeed's bf16 mode.
    if recorded not in (frozen_digest(model)["sha256"], frozen_digest(model, torch.bfloat16)["sha256"]):
        raise ConfigError(
            f"the rebuilt frozen weights differ from those {folder.name} was trained with: "
            "their source (vision.path/llm.path or the run's seed) changed"
        )


# Environment variables whose values never reach a file of the run dir.
SECRET_NAME = re.compile(r"^(WANDB_API_KEY|HF_TOKEN)$|_TOKEN$|_SECRET|SECRET_|_KEY$|PASSWORD")


def redact_secrets(text: str) -> str:
    """`text` with the value of every secret-looking environment variable replaced by its name."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8:  # short values ("1", "true") are not secrets
            text = text.replace(value, f"<redacted:{name}>")
    return text


def consolidated_state_dict(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trained model's fp32 weights from one checkpoint folder, whatever the ZeRO stage.

    Frozen parameters are not in checkpoints (see the module docstring); load the result with
    `load_trained_weights`, which checks that only frozen ones are missing.
    """
    verify_folder(folder)  # DeepSpeed's zero_to_fp32 below uses torch.load(weights_only=False)
    if zero_stage == 0:
        states = safe_torch_load(folder / "mp_rank_00_model_states.pt")
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


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
