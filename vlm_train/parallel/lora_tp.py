"""LoRA on the megatron decoder (llm.backend=megatron, any TP size), split the way each base weight is.

A column-parallel layer (linear_qkv, linear_fc1: output rows split over TP) keeps A [r, in] whole on
every TP rank and B [out/tp, r] split like its weight: the update of its output slice is
B_rank A x. A's gradient is the sum over the ranks' slices (`copy_to_tensor_model_parallel_region` on
A x: identity forward, all-reduce backward). A row-parallel layer (linear_proj, linear_fc2: input
columns split) keeps A [r, in/tp] split like its weight and B [out, r] whole: the ranks' A_rank x_rank
are summed (`reduce_from_tensor_model_parallel_region`) before B. Every rank draws the whole A from the
same generator state and keeps its slice, so a TP=2 run starts from TP=1's updates and trains as it
does. HF target names select the fused megatron layers (q_proj/k_proj/v_proj -> linear_qkv: one update
for the three; o_proj -> linear_proj; gate_proj/up_proj -> linear_fc1; down_proj -> linear_fc2).
`merge_megatron_lora` folds each rank's slice of B A into its weight slice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlm_train.config import LoRAConfig
from vlm_train.errors import ConfigError
from vlm_train.models.lora import ALL_LINEAR

MEGATRON_NAME = {
    "q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2",
}  # fmt: skip
LAYERS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class ParallelLoRA(nn.Module):
    """The update of one column- or row-parallel layer (this TP rank's part of it)."""

    def __init__(self, layer: Any, cfg: LoRAConfig, tp: int, tp_rank: int):
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.column = isinstance(layer, ColumnParallelLinear)
        out_local, in_local = layer.weight.shape
        in_full = in_local if self.column else in_local * tp
        a_full = torch.empty(cfg.rank, in_full)
        nn.init.kaiming_uniform_(a_full, a=math.sqrt(5))  # the same draw on every TP rank (and at TP=1)
        a = a_full if self.column else a_full.chunk(tp, dim=1)[tp_rank]
        out = out_local if self.column else layer.weight.shape[0]
        dtype, device = layer.weight.dtype, layer.weight.device
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(out, cfg.rank, device=device, dtype=dtype))
        split = (self.lora_B, 0) if self.column else (self.lora_A, 1)
        set_tensor_model_parallel_attributes(split[0], is_parallel=True, dim=split[1], stride=1)
        self.scaling = cfg.alpha / cfg.rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        h = x.to(self.lora_A.dtype) @ self.lora_A.t()
        h = copy_to_tensor_model_parallel_region(h) if self.column else reduce_from_tensor_model_parallel_region(h)
        return (h @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """This rank's slice of (alpha / r) B A, shaped as its weight."""
        return (self.lora_B @ self.lora_A) * self.scaling


def _add_update(module: Any, args: tuple, output: Any) -> Any:
    lora = module.lora
    if not lora.enabled:
        return output
    out, bias = output
    return out + lora(args[0]).to(out.dtype), bias


def add_megatron_lora(gpt: nn.Module, cfg: LoRAConfig, tp: int, tp_rank: int) -> list[str]:
    """LoRA on the targeted layers of a megatron GPTModel (its weights frozen), in place; the names."""
    if cfg.dropout:
        raise ConfigError("llm.lora.dropout with llm.backend=megatron is not built (TP ranks would drop unalike)")
    wanted = set(LAYERS) if ALL_LINEAR in cfg.targets else {MEGATRON_NAME.get(t, t) for t in cfg.targets}
    unknown = sorted(wanted - set(LAYERS))
    if unknown:
        raise ConfigError(
            f"llm.lora.targets={list(cfg.targets)}: {unknown} names no layer of the megatron decoder; "
            f"use {', '.join(sorted(MEGATRON_NAME))} or {', '.join(LAYERS)}"
        )
    chosen = [(name, m) for name, m in gpt.named_modules() if name.rsplit(".", 1)[-1] in wanted]
    for _, layer in chosen:
        for param in layer.parameters():
            param.requires_grad_(False)
        layer.add_module("lora", ParallelLoRA(layer, cfg, tp, tp_rank))
        layer.register_forward_hook(_add_update)
    return [name for name, _ in chosen]


@torch.no_grad()
def merge_megatron_lora(gpt: nn.Module) -> int:
    """Fold every update into this rank's weight slice and remove it (in place); returns how many."""
    merged = 0
    for _, layer in list(gpt.named_modules()):
        lora = getattr(layer, "lora", None)
        if not isinstance(lora, ParallelLoRA):
            continue
        layer.weight.add_(lora.delta_weight().to(layer.weight.dtype))
        for key in [key for key, hook in layer._forward_hooks.items() if hook is _add_update]:
            del layer._forward_hooks[key]
        del layer.lora
        merged += 1
    return merged
