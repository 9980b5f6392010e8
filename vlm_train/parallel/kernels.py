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
  package imports (refused with a clear message when it does not).
- Transformer Engine: reported; megatron-core's local layer spec is used without it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

from torch import nn

from vlm_train.errors import ConfigError


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

    def report(self, attn_implementation: str = "sdpa") -> str:
        optimizer = "torch AdamW fused" if self.fused_adamw else "torch AdamW (for-each, CPU)"
        apex = "present, unused" if self.apex else "absent"
        flash = "present" if self.flash_attn else "absent"
        te = "present" if self.transformer_engine else "absent"
        return (
            f"kernels: attention {attn_implementation} (flash-attn {flash}), optimizer {optimizer}, "
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


def compile_model(model: nn.Module, zero_stage: int) -> None:
    """`train.compile`: torch.compile the model's forward in place (`Module.compile`, so parameter
    names and checkpoints stay as they are) before DeepSpeed wraps it. Works on CPU too (inductor
    builds C++ kernels; the first step then takes about a minute on 2 cores). Refused under ZeRO-3,
    whose parameter-gathering hooks torch.compile does not trace."""
    if zero_stage == 3:
        raise ConfigError("train.compile=true is not supported with parallel.zero_stage=3: use ZeRO 0-2 to compile")
    if not hasattr(model, "compile"):
        raise ConfigError("train.compile=true needs torch >= 2.2 (Module.compile)")
    # Graph breaks at the model's data-dependent checks (image slots, no-image batches) are
    # expected; dynamo would print a warning block for each.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    model.compile()
