"""Whether a run dir's checkpoint may resume under the current config."""

from __future__ import annotations

from pathlib import Path

from vlm_train.config import Config
from vlm_train.errors import ConfigError

# What must match for a checkpoint to resume: the model, the TP sharding and the data layout.
# The data-parallel size and the ZeRO stage (1-3) may change: see `checkpoint.load` (resharding).
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
