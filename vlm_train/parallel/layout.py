"""The one object that knows the parallel layout: world = tensor parallel x data parallel.

Validated once at start-up; process groups are built here and handed out explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_train.config import Config
from vlm_train.errors import LayoutError


@dataclass(frozen=True)
class Layout:
    """Ranks are grouped Megatron-style: the `tp` ranks of a tensor-parallel group are contiguous."""

    world: int
    rank: int
    tp: int
    zero_stage: int

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
        if world % tp:
            raise LayoutError(f"parallel.tensor_parallel={tp} does not divide the world size {world}")
        if tp > 1 and cfg.llm.backend != "megatron":
            raise LayoutError(
                f"parallel.tensor_parallel={tp} needs the tensor-parallel decoder (llm.backend=megatron), "
                "which this version does not have yet: use parallel.tensor_parallel=1"
            )
        return cls(world=world, rank=rank, tp=tp, zero_stage=cfg.parallel.zero_stage)
