"""Optional fast kernels, decided in one place: apex, flash-attn, Transformer Engine.

Probed once per process (`probe_kernels`); the rest of the code asks the returned object instead
of trying imports of its own, and `vlm-train` prints its `report()` line at start-up.

What each decides:
- optimizer: torch's AdamW with `fused=True` on CUDA (one multi-tensor kernel, what apex's
  FusedAdam gives; torch has it built in, so apex is not needed for it); the plain loop on CPU.
- norms: torch's, with or without apex: the HF decoders use their own RMSNorm, and megatron-core's
  local spec picks its torch norm for RMSNorm (`WrappedTorchNorm`) even where apex imports. apex
  is probed and reported only (e.g. for the NGC image), not used.
- attention: `llm.attn_implementation` as configured: sdpa (torch's fused attention, which picks
  its flash / memory-efficient kernels itself on GPU), or flash_attention_2 when the flash-attn
  package imports (refused with a clear message when it does not). Packed rows (data.packing) run
  variable-length attention, no [T, T] mask: under sdpa the decoder is built with "vlm_varlen",
  whose kernel (torch's varlen_attn, or SDPA per sample) models/varlen_attention.py picks per call
  (`varlen_kernel`: it depends on dtype, and models/ may not import this module); under
  flash_attention_2 transformers hands the same segments to flash-attn's varlen function.
- Transformer Engine: reported; megatron-core's local layer spec is used without it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from torch import nn

from vlm_train.errors import ConfigError
from vlm_train.models.varlen_attention import torch_varlen_attn


@dataclass(frozen=True)
class Kernels:
    """Which optional kernels this process has (see the module docstring for what uses them)."""

    device_type: str
    apex: bool
    flash_attn: bool
    transformer_engine: bool

    @property
    def fused_adamw(self) -> bool:
        return self.device_type == "cuda"

    def optimizer_kwargs(self) -> dict:
        """Extra keyword arguments for torch.optim.AdamW."""
        return {"fused": True} if self.fused_adamw else {}

    def check_attention(self, attn_implementation: str) -> None:
        """Refuse flash_attention_2 without the flash-attn package (or without a GPU)."""
        if attn_implementation == "flash_attention_2" and not (self.flash_attn and self.device_type == "cuda"):
            raise ConfigError(
                "llm.attn_implementation=flash_attention_2 needs the flash-attn package and a GPU: "
                "use llm.attn_implementation=sdpa (torch's fused attention)"
            )

    def packed_attention(self, attn_implementation: str) -> str:
        """What attends packed rows (data.packing) under `attn_implementation`."""
        if attn_implementation == "flash_attention_2":
            return "flash-attn varlen"
        if attn_implementation != "sdpa":
            return f"{attn_implementation} with a dense block mask"
        if self.device_type == "cuda" and torch_varlen_attn() is not None:
            return "vlm_varlen: torch varlen_attn in bf16/fp16, SDPA per sample in fp32"
        return "vlm_varlen: SDPA per sample"

    def report(self, attn_implementation: str = "sdpa", packing: bool = False) -> str:
        optimizer = "torch AdamW fused" if self.fused_adamw else "torch AdamW (for-each, CPU)"
        apex = "present, unused" if self.apex else "absent"
        flash = "present" if self.flash_attn else "absent"
        te = "present" if self.transformer_engine else "absent"
        packed = f", packed rows {self.packed_attention(attn_implementation)}" if packing else ""
        return (
            f"kernels: attention {attn_implementation} (flash-attn {flash}{packed}), optimizer {optimizer}, "
            f"norms torch (apex {apex}), Transformer Engine {te}"
        )


@functools.cache
def probe_kernels(device_type: str) -> Kernels:
    """Probe once per process and device type; imports nothing heavy that is absent."""
    return Kernels(
        device_type=device_type,
        apex=_importable("apex") and _importable("apex.normalization"),
        flash_attn=_importable("flash_attn"),
        transformer_engine=_importable("transformer_engine"),
    )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def compile_model(model: nn.Module, zero_stage: int, backend: str = "inductor") -> int:
    """`train.compile`: torch.compile each decoder block and each vision-tower encoder layer in
    place (`Module.compile`, so parameter names and checkpoints stay as they are) before DeepSpeed
    wraps the model, as torchtitan compiles per block: the blocks are where the time goes, every
    block of a stack has the same code (dynamo compiles it once and reuses it, parameters being
    graph inputs), and the glue around them (image slots, no-image batches, packing) has
    data-dependent branches that would break a whole-model graph. Works on CPU too (inductor builds
    C++ kernels; the first step then takes one to two minutes on 2 cores). Refused under ZeRO-3,
    whose parameter-gathering hooks torch.compile does not trace. Returns the number of blocks."""
    if zero_stage == 3:
        raise ConfigError("train.compile=true is not supported with parallel.zero_stage=3: use ZeRO 0-2 to compile")
    blocks = compiled_blocks(model)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder's blocks and the tower's encoder layers (where the model has them)."""
    llm = getattr(model, "llm", None)
    blocks: list[nn.Module] = list(llm.decoder_layers()) if llm is not None else []
    tower = getattr(getattr(model, "vision", None), "hf_model", None)
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    return blocks + list(getattr(encoder, "layers", []))
