"""The one object that knows the parallel layout: world = tensor parallel x data parallel.

Validated once at start-up (against the world size and the decoder's shape); the process groups
are built here once (`Layout.build_groups`) and handed out explicitly, including the `mpu` object
DeepSpeed needs at TP > 1. Without it DeepSpeed averages gradients over the whole world, TP
ranks included, and trains wrong without an error (../shared/NOTES.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlm_train.config import Config, LLMConfig
from vlm_train.errors import ConfigError, LayoutError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Layout:
    """Ranks are grouped Megatron-style: the `tp` ranks of a tensor-parallel group are contiguous."""

    world: int
    rank: int
    tp: int
    zero_stage: int
    backend: str = "hf"  # llm.backend: megatron builds megatron-core's groups and hands DeepSpeed an mpu

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @classmethod
    def from_config(cls, cfg: Config, world: int, rank: int) -> Layout:
        """Check the layout against the world size and the model before anything is built."""
        tp = cfg.parallel.tensor_parallel
        if tp > 1 and cfg.llm.backend != "megatron":
            raise LayoutError(
                f"parallel.tensor_parallel={tp} needs the tensor-parallel decoder: use llm.backend=megatron (or auto)"
            )
        if cfg.parallel.sequence_parallel:
            raise LayoutError(sequence_parallel_refusal())
        if cfg.llm.backend == "megatron":
            check_megatron_decoder(cfg, tp)
        if world % tp:
            raise LayoutError(
                f"parallel.tensor_parallel={tp} does not divide the world size {world}: "
                f"launch a multiple of {tp} processes or change parallel.tensor_parallel"
            )
        return cls(world=world, rank=rank, tp=tp, zero_stage=cfg.parallel.zero_stage, backend=cfg.llm.backend)

    def build_groups(self, seed: int = 0) -> ModelParallelUnit | None:
        """Create the TP and DP groups once (megatron's parallel_state, after torch.distributed is up)
        and return DeepSpeed's `mpu` for them; None for the HF backend (one DP group = the world).
        `seed` seeds megatron's model-parallel RNG stream (its dropout draws from it)."""
        if self.backend != "megatron":
            return None
        import torch
        from megatron.core import parallel_state, tensor_parallel

        from vlm_train.parallel.megatron_cpu import adapt_megatron_for_cpu

        if parallel_state.model_parallel_is_initialized():
            if parallel_state.get_tensor_model_parallel_world_size() == self.tp:
                return ModelParallelUnit(self)
            parallel_state.destroy_model_parallel()  # another layout in this process (tests)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp)
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        else:
            adapt_megatron_for_cpu(seed=seed, tp_rank=self.tp_rank)
        return ModelParallelUnit(self)


def decoder_shape(cfg: LLMConfig) -> dict[str, int]:
    """Heads, KV heads and FFN width of the decoder `cfg` describes (from `config.json` for a path)."""
    if not cfg.path:
        return {
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.intermediate_size,
        }
    config_file = Path(cfg.path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"llm.path={cfg.path} has no config.json: give a local Hugging Face checkpoint directory")
    hf = json.loads(config_file.read_text())
    hf = {**hf, **hf.get("text_config", {})}  # a Qwen-VL folder: the decoder's fields may sit in text_config
    heads = hf["num_attention_heads"]
    return {
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "intermediate_size": hf["intermediate_size"],
    }


def sequence_parallel_refusal() -> str:
    """Why `parallel.sequence_parallel=true` is refused: the decoder's norms are megatron's torch
    norms (its local spec, also where apex or Transformer Engine import), which refuse a split
    sequence, and the connector hooks see whole sequences."""
    return (
        "parallel.sequence_parallel=true is not supported: vlm_train's megatron decoder uses torch norms "
        "(megatron-core's local spec), which cannot split the sequence: use parallel.sequence_parallel=false"
    )


def check_megatron_decoder(cfg: Config, tp: int) -> None:
    """The megatron decoder is Llama-family (or Qwen2(.5)-VL's M-RoPE decoder) and splits evenly over `tp` ranks (packing, which it
    cannot mask, is refused with the config: config.validate)."""
    if cfg.llm.family not in ("llama", "mistral", "qwen2_vl", "qwen2_5_vl"):
        raise LayoutError(
            f"llm.backend=megatron builds Llama-family and Qwen2(.5)-VL decoders, not llm.family={cfg.llm.family}"
        )
    check_decoder_splits(cfg.llm, tp)


def check_decoder_splits(cfg: LLMConfig, tp: int) -> None:
    """Each TP rank must own whole attention heads, whole KV groups and an equal slice of the FFN."""
    shape = decoder_shape(cfg)
    heads, kv_heads, ffn = shape["num_heads"], shape["num_kv_heads"], shape["intermediate_size"]
    if heads % tp:
        raise LayoutError(f"parallel.tensor_parallel={tp} does not divide the decoder's {heads} attention heads")
    if kv_heads % tp:
        raise LayoutError(
            f"parallel.tensor_parallel={tp} does not divide the decoder's {kv_heads} key/value heads: megatron-core "
            f"gives every TP rank whole KV groups (no replication); use a TP size that divides {kv_heads}"
        )
    if ffn % tp:
        raise LayoutError(f"parallel.tensor_parallel={tp} does not divide the decoder's FFN width {ffn}")


class ModelParallelUnit:
    """DeepSpeed's `mpu`: megatron's group getters plus the model-parallel names DeepSpeed asks for.

    DeepSpeed reduces gradients over `get_data_parallel_group()` and counts TP-sharded parameters
    once per TP group in the gradient norm (clipping) through `get_model_parallel_*`.
    """

    def __init__(self, layout: Layout):
        import torch
        from megatron.core import parallel_state

        self.layout = layout
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._dp_group = parallel_state.get_data_parallel_group()
        self._dp_ranks = torch.distributed.get_process_group_ranks(self._dp_group)
        self._tp_src = parallel_state.get_tensor_model_parallel_src_rank()

    def get_model_parallel_group(self) -> ProcessGroup:
        return self._tp_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._tp_src

    def get_data_parallel_group(self) -> ProcessGroup:
        return self._dp_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)


def destroy_groups() -> None:
    """Forget megatron's groups (tests that build several layouts in one process)."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
