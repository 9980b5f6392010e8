"""Reading a tensor-parallel run's checkpoint (any ZeRO stage) into the same VLM built with the HF
decoder: what `vlm-convert` does with an `llm.backend=megatron` run.

DeepSpeed's checkpoint files are parallel/engine_checkpoint.py's business, a layer above interop:
the caller hands its two readers in (`CheckpointReaders`), so this module only knows the TP file
names and how the TP ranks' weights join.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_train.errors import ConfigError
from vlm_train.interop.megatron import DecoderShape, hf_to_megatron, megatron_to_hf
from vlm_train.interop.tp_plan import join_cross_attention_shards
from vlm_train.models.llm import CausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class CheckpointReaders:
    """How to read DeepSpeed's checkpoint files (vlm_train.parallel.engine_checkpoint's functions)."""

    safe_torch_load: Callable[[Path], Any]  # one .pt file, never unpickling code
    consolidated_state_dict: Callable[[Path, int], dict[str, torch.Tensor]]  # (folder, ZeRO stage) -> fp32 weights


def tp_rank_files(folder: Path, tp_rank: int, into: Path) -> Path:
    """A view of checkpoint `folder` holding only TP rank `tp_rank`'s files, named as a TP=1
    checkpoint's (links, nothing copied): DeepSpeed's ZeRO consolidation then reads one TP rank."""
    view = into / folder.name
    view.mkdir(parents=True)
    for path in folder.iterdir():
        if "mp_rank_" not in path.name:
            (view / path.name).symlink_to(path.resolve())
        elif f"mp_rank_{tp_rank:02d}" in path.name:
            (view / path.name.replace(f"mp_rank_{tp_rank:02d}", "mp_rank_00")).symlink_to(path.resolve())
    return view


def _tp_rank_weights(view: Path, zero_stage: int, read: CheckpointReaders) -> dict[str, torch.Tensor]:
    if zero_stage > 0:
        return read.consolidated_state_dict(view, zero_stage)
    # megatron's layers add `_extra_state` entries (None) that the generic reader would not take
    module = read.safe_torch_load(view / "mp_rank_00_model_states.pt")["module"]
    return {name: value.float() for name, value in module.items() if isinstance(value, torch.Tensor)}


def load_tp_checkpoint(
    model: nn.Module, folder: Path, zero_stage: int, tp: int, read: CheckpointReaders, lora_scaling: float = 0.0
) -> None:
    """Load a TP run's checkpoint into `model`, the same VLM built with the HF decoder.

    Each TP rank's weights are consolidated over ZeRO, the decoder shards are joined into HF
    names, tower and connector come from TP rank 0 (whole on every TP rank) except the
    cross-attention blocks' split linears, which are joined too. Parameters the
    run kept frozen (not in checkpoints) keep the values `model` was rebuilt with. `read` holds
    parallel/engine_checkpoint.py's readers. LoRA slices (llm.lora; `lora_scaling` = alpha / rank) are
    merged into their weight slices before the join: `model` is built without decoder LoRA.
    """
    llm = model.get_submodule("llm")
    if not isinstance(llm, CausalLM):
        raise TypeError(f"a TP checkpoint loads into a model with the HF decoder, not {type(llm).__name__}")
    hf_model: PreTrainedModel = llm.hf_model
    with tempfile.TemporaryDirectory() as scratch:
        views = [tp_rank_files(folder, r, Path(scratch) / str(r)) for r in range(tp)]
        states = [_tp_rank_weights(view, zero_stage, read) for view in views]
    shape = DecoderShape.from_hf_config(hf_model.config, llm.vocab_size)
    rebuilt = hf_model.state_dict()
    shards = []
    for rank, state in enumerate(states):
        shard = hf_to_megatron(rebuilt, shape, tp, rank)  # frozen decoder weights: as rebuilt
        shard.update({k.removeprefix("llm.gpt."): v for k, v in state.items() if k.startswith("llm.gpt.")})
        shards.append(merge_lora_shard(shard, lora_scaling))
    whole = join_cross_attention_shards([{k: v for k, v in s.items() if not k.startswith("llm.")} for s in states])
    whole.update({f"llm.hf_model.{k}": v for k, v in megatron_to_hf(shards, shape).items()})
    if shape.tied:
        whole.pop("llm.hf_model.lm_head.weight")
    _load_checked(model, whole, folder)


def _load_checked(model: nn.Module, whole: dict[str, torch.Tensor], folder: Path) -> None:
    """Load `whole`; only weights the run kept frozen (and a tied lm_head) may be missing from it."""
    missing, unexpected = model.load_state_dict(whole, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    if unexpected or set(missing) - frozen - {"llm.hf_model.lm_head.weight"}:
        raise ConfigError(
            f"{folder} does not fit the model: missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]}"
        )


def merge_lora_shard(shard: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """One TP rank's saved decoder weights with its LoRA slices folded into their weights (what
    `vlm-convert` joins; parallel/lora_tp.py makes them): `<layer>.lora.lora_A` / `lora_B` -> `<layer>.weight` += scaling B A."""
    out = {k: v for k, v in shard.items() if ".lora." not in k}
    for key in [k for k in shard if k.endswith(".lora.lora_A")]:
        layer = key.removesuffix(".lora.lora_A")
        delta = shard[f"{layer}.lora.lora_B"].float() @ shard[key].float() * scaling
        out[f"{layer}.weight"] = out[f"{layer}.weight"].float() + delta
    return out
