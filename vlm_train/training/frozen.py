"""Fingerprints of the frozen parameters, which checkpoints leave out.

Frozen pretrained weights (a frozen tower or LLM) are not rewritten into every checkpoint: they
are rebuilt from their source (`vision.path`, `llm.path` or the run's seed) on resume, and
`frozen.json` holds their SHA-256 so that a changed source is refused instead of silently
training a different model.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlm_train.config import Config
from vlm_train.errors import ConfigError
from vlm_train.parallel.engine import TrainEngine
from vlm_train.parallel.engine_checkpoint import full_tensor

FROZEN_FILE = "frozen.json"

# Computed once per engine: frozen weights never change while training.
_DIGESTS: weakref.WeakKeyDictionary[TrainEngine, dict[str, Any]] = weakref.WeakKeyDictionary()


def frozen_fingerprint(engine: TrainEngine, cfg: Config | None = None) -> dict[str, Any]:
    """Count, size and SHA-256 of the frozen parameters, plus where they come from.
    Collective the first time (ZeRO-3 gathers each frozen parameter; TP ranks exchange digests)."""
    if engine not in _DIGESTS:
        _DIGESTS[engine] = _across_tensor_parallel(frozen_digest(engine.module), engine)
    fingerprint = dict(_DIGESTS[engine])
    if cfg is not None:
        fingerprint["source"] = {
            "vision.path": cfg.vision.path,
            "llm.path": cfg.llm.path,
            "connector.path": cfg.connector.path,
            "run.seed": cfg.run.seed,  # random initialisation when a path is null
        }
    return fingerprint


def _across_tensor_parallel(digest: dict[str, Any], engine: TrainEngine) -> dict[str, Any]:
    """Under tensor parallelism each rank holds its own shards of a frozen decoder: one digest over
    the TP group's digests (in TP-rank order), the same on every rank whatever the DP size."""
    if engine.tensor_parallel == 1:
        return digest
    digests: list[Any] = [None] * engine.tensor_parallel
    dist.all_gather_object(digests, digest, group=engine.model_parallel_group)
    combined = hashlib.sha256("".join(d["sha256"] for d in digests).encode()).hexdigest()
    return {
        "parameters": sum(d["parameters"] for d in digests),
        "numel": sum(d["numel"] for d in digests),
        "sha256": combined,
        "tensor_parallel": len(digests),
    }


def frozen_digest(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """SHA-256 over the names and bytes of `module`'s frozen parameters (cast to `dtype` if given).
    Collective when the engine partitions parameters (ZeRO-3)."""
    digest, count, numel = hashlib.sha256(), 0, 0
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        tensor = full_tensor(param).detach().cpu()
        tensor = tensor.to(dtype) if dtype is not None else tensor
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        count, numel = count + 1, numel + tensor.numel()
    return {"parameters": count, "numel": numel, "sha256": digest.hexdigest()}


def check_frozen_weights(engine: TrainEngine, folder: Path, cfg: Config | None = None) -> None:
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
    # The engine held them in the run's precision: fp32, or bf16 in a bf16 run.
    if recorded not in (frozen_digest(model)["sha256"], frozen_digest(model, torch.bfloat16)["sha256"]):
        raise ConfigError(
            f"the rebuilt frozen weights differ from those {folder.name} was trained with: "
            "their source (vision.path/llm.path or the run's seed) changed"
        )
