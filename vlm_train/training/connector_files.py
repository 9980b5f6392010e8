"""The connector of a run, in the files stage 2 (or anyone) loads it from.

    <run.dir>/connector.safetensors   every connector: its state dict, fp32 (vlm_train's keys)
    <run.dir>/mm_projector.bin        mlp only: LLaVA's own file, `torch.save` of
                                      {"model.mm_projector.0.weight": ..., "model.mm_projector.0.bias": ...,
                                       "model.mm_projector.2.weight": ..., ...}, as LLaVA's
                                      `safe_save_model_for_hf_trainer` writes it in stage 1

Both are rewritten by every checkpoint save (the end of a run included), after the checkpoint is
published, so they hold the weights of the newest complete checkpoint. `connector.path` takes
either file, or the run dir itself (vlm_train/models/connectors/__init__.py).

The values are the trained fp32 weights: the engine's fp32 master copy when it keeps one (bf16
training, ZeRO 1-3), else the module's parameters, gathered first where ZeRO-3 partitions them.
LLaVA saves the bf16 module copy instead; loading either into a bf16 run gives the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from vlm_train.config import Config
from vlm_train.parallel.engine import TrainEngine
from vlm_train.parallel.engine_checkpoint import full_fp32

CONNECTOR_FILE = "connector.safetensors"
LLAVA_PROJECTOR_FILE = "mm_projector.bin"
LLAVA_PREFIX = "model.mm_projector."  # LLaVA's name of the projector inside LlavaLlamaForCausalLM


def write_connector_files(engine: TrainEngine, run_dir: Path, step: int, cfg: Config) -> None:
    """Collective: every rank helps gather the connector; rank 0 writes the files atomically."""
    state = gather_connector(engine, cfg)
    if dist.get_rank() == 0 and state is not None:
        write_connector_state(state, run_dir, step, cfg)


def gather_connector(engine: TrainEngine, cfg: Config) -> dict[str, torch.Tensor] | None:
    """Collective: the connector's fp32 state for its files (a copy on CPU); None where they are
    not written (tensor-parallel cross-attention)."""
    connector = engine.module.connector
    if connector is None:  # pretraining (objective=lm|clip|siglip): a model without one
        return None
    assert isinstance(connector, torch.nn.Module)
    if cfg.parallel.tensor_parallel > 1 and connector.placement == "cross_attention":
        return None  # its blocks are split over TP ranks like the decoder: `vlm-convert consolidate` joins them
    return connector_state(connector)


def write_connector_state(state: dict[str, torch.Tensor], run_dir: Path, step: int, cfg: Config) -> None:
    """Rank 0: write `state` (from `gather_connector`) as the run's connector files."""
    from safetensors.torch import save_file

    metadata = {"format": "vlm_train", "connector": cfg.connector.name, "step": str(step)}
    _atomic(run_dir / CONNECTOR_FILE, lambda path: save_file(state, path, metadata=metadata))
    if cfg.connector.name == "mlp":
        llava = {f"{LLAVA_PREFIX}{name}": tensor for name, tensor in state.items()}
        _atomic(run_dir / LLAVA_PROJECTOR_FILE, lambda path: torch.save(llava, path))


def connector_state(connector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The connector's whole fp32 state dict on CPU, whatever ZeRO stage holds it (collective)."""
    state = {}
    for name, value in connector.state_dict(keep_vars=True).items():  # the keys load_state_dict expects
        if isinstance(value, torch.nn.Parameter):
            state[name] = full_fp32(value)
        else:  # a persistent buffer: floating ones in fp32 like the weights, others as they are
            buffer = value.detach().cpu().clone()
            state[name] = buffer.float() if buffer.is_floating_point() else buffer
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _atomic(path: Path, write) -> None:
    """Write through a temporary name then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
