"""LoRA (Hu et al., 2021), as PEFT formulates it: a frozen linear layer W x gets a trainable low-rank
update, y = W x + (alpha / r) B A dropout(x), with A [r, in] Kaiming-uniform and B [out, r] zero, so
training starts from the base model exactly.

The update is attached in place: each targeted `nn.Linear` gets a `lora` child (`lora_A`, `lora_B`)
and a forward hook that adds it. The base weights keep their names, so checkpoints (which leave
frozen weights out), the frozen-weight fingerprints and the Hugging Face import/export see the
model they saw without LoRA; `merge_lora` folds each update into its weight (W += (alpha / r) B A)
for export, and `lora_disabled` runs the base model (a preference objective's reference).

Legend: r rank, Din / Dout the layer's input / output width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlm_train.config import LoRAConfig
from vlm_train.errors import ConfigError

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head",)  # never targeted by "all-linear" (PEFT leaves the output layer out too)
# the megatron decoder's fused layers (parallel/lora_tp.py) by the HF layers they hold, so either name works
HF_LAYERS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",),
}  # fmt: skip


class LoRA(nn.Module):
    """The update B A x (alpha / r) of one linear layer [Din -> Dout]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init of A
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A [Dout, Din]: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def lora_of(linear: nn.Module) -> LoRA:
    """The LoRA update attached to `linear`."""
    lora = getattr(linear, "lora", None)
    assert isinstance(lora, LoRA), "a linear layer without LoRA"
    return lora


def _add_update(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    lora = lora_of(module)
    if not lora.enabled:
        return output
    return output + lora(args[0]).to(output.dtype)


def add_lora(component: nn.Module, cfg: LoRAConfig, what: str, unused: Sequence[nn.Parameter] = ()) -> list[str]:
    """LoRA on `component`'s targeted linear layers (their weights frozen), in place, but for layers
    whose weight is `unused` (no gradient reaches them); returns the names of the layers it went on.
    A target matching no linear layer is a ConfigError."""
    skip = {id(param) for param in unused}
    targets = [name for target in cfg.targets for name in HF_LAYERS.get(target, (target,))]
    linears = {
        name: m
        for name, m in component.named_modules()
        if isinstance(m, nn.Linear) and not hasattr(m, "lora") and id(m.weight) not in skip
    }
    chosen = [name for name in linears if _targeted(name, targets)]
    unmatched = [t for t in targets if t != ALL_LINEAR and not any(_matches(n, t) for n in chosen)]
    if unmatched or not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ConfigError(
            f"{what}.targets={list(cfg.targets)}: {unmatched or 'nothing'} matches no linear layer; "
            f"its linear layers end in {', '.join(suffixes[:12]) or 'nothing'}"
        )
    for name in chosen:
        linear = linears[name]
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        lora = LoRA(linear.in_features, linear.out_features, cfg.rank, cfg.alpha, cfg.dropout)
        linear.add_module("lora", lora.to(device=linear.weight.device))
        linear.register_forward_hook(_add_update)
    return chosen


def _targeted(name: str, targets: list[str]) -> bool:
    if ALL_LINEAR in targets and name.rsplit(".", 1)[-1] not in OUTPUT_HEADS:
        return True
    return any(_matches(name, target) for target in targets)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers that carry a LoRA update, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora")]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its layer's weight and remove it (in place); returns how many."""
    updates = strip_lora(model)
    for linear, lora in updates:
        linear.weight.add_(lora.delta_weight().to(device=linear.weight.device, dtype=linear.weight.dtype))
    return len(updates)


def strip_lora(model: nn.Module) -> list[tuple[nn.Linear, LoRA]]:
    """Take every LoRA update off its layer (the layer back to its base weights), in place; returns
    the (layer, update) pairs."""
    updates = []
    for _, linear in lora_layers(model):
        updates.append((linear, lora_of(linear)))
        for key in [key for key, hook in linear._forward_hooks.items() if hook is _add_update]:
            del linear._forward_hooks[key]
        del linear.lora
    return updates


def lora_updates(model: nn.Module) -> list[Any]:
    """Every LoRA update in `model`: on nn.Linear layers (LoRA) and on the megatron decoder's
    parallel layers (parallel/lora_tp.py's ParallelLoRA)."""
    updates = [getattr(module, "lora", None) for module in model.modules()]
    return [update for update in updates if isinstance(update, nn.Module) and hasattr(update, "enabled")]


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Forwards in this context run the base model (every LoRA update off)."""
    updates: list[Any] = lora_updates(model)
    for lora in updates:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in updates:
            lora.enabled = True
