"""megatron-core on a CPU-only torch build: the few places that assume CUDA, adapted in one spot.

megatron-core 0.16 allocates scratch buffers on `torch.cuda.current_device()` (tensor-parallel
gathers, RoPE frequencies), builds its default causal mask with `device="cuda"`, and keeps the
model-parallel RNG streams as CUDA generator states. On a machine without CUDA each of these
raises "Torch not compiled with CUDA enabled". `adapt_megatron_for_cpu()` redirects exactly
these to the CPU; it does nothing when CUDA is available, so none of it runs on a GPU.
Megatron's optimizer, grad scaler, clipping and pipeline schedules also assume CUDA: vlm_train
uses DeepSpeed's instead and never calls them.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

# Modules that read `torch.cuda.current_device()` for scratch buffers on the paths we run.
_SCRATCH_ON_CURRENT_DEVICE = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.utils",  # the global memory buffer attention scores are computed in
)
_MODEL_PARALLEL_RNG = "model-parallel-rng"
_applied = False


class _CpuCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside the adapted modules: the current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by an adapted module: everything is torch's except `torch.cuda`."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker with CPU generator states: named RNG streams that `fork`
    swaps in (model-parallel dropout and initialisation draw from them)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG stream {name} (seed {seed}) already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise RuntimeError(f"RNG stream {name} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _causal_mask_on_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def adapt_megatron_for_cpu(seed: int = 0, tp_rank: int = 0) -> bool:
    """Apply the CPU adaptation once (no-op with CUDA). Returns whether it is in effect.

    The model-parallel RNG stream is seeded per TP rank, as megatron's
    `model_parallel_cuda_manual_seed` does on a GPU.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch_on_cpu = _TorchOnCpu()
        # ModuleType declares none of the attributes patched below: megatron's modules are Any here
        for name in _SCRATCH_ON_CURRENT_DEVICE:
            module: Any = importlib.import_module(name)
            module.torch = torch_on_cpu
        for name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
            module = importlib.import_module(name)
            module.get_default_causal_mask = _causal_mask_on_cpu
        _applied = True
    random: Any = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker = CpuRNGStatesTracker()
    tracker.add(_MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)  # megatron's offset for the TP stream
    random._CUDA_RNG_STATE_TRACKER = tracker
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True
