"""Batch and step arithmetic: the global batch, accumulation, steps per epoch and warmup.

`train.global_batch_size` (samples per optimizer step) is what a recipe states; the rest follows
from the layout. The rule, as Megatron-LM states it (global batch = micro-batch x data-parallel
ranks x accumulation steps, exactly, or an error):

- `train.micro_batch_size` is a per-rank maximum. Where it exceeds global / dp (LLaVA stage 1's
  32 at 16 ranks x 32 = 512 > 256) it is lowered to global / dp and accumulation is 1.
- Otherwise accumulation = global / (micro x dp), which must be a whole number.
- Anything else is a one-line ConfigError naming the numbers to change; the global batch is never
  silently different from the one asked for.

`train.epochs` sets `train.max_steps` to epochs x (samples in data.urls) / global batch, rounded
down: every step is a whole global batch (HF Trainer would add one partial last batch).
`train.warmup_ratio` sets `train.warmup_steps` to ceil(ratio x steps), as HF Trainer computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlm_train.config import Config, DataConfig, TrainConfig
from vlm_train.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is made: `grad_accum` micro-batches of `micro_batch_size` on each of `dp` ranks."""

    micro_batch_size: int
    dp: int
    grad_accum: int
    requested_micro: int  # train.micro_batch_size as given (the per-rank maximum)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp * self.grad_accum

    def describe(self) -> str:
        """The start-up line: global batch = micro x dp x accumulation."""
        line = (
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x "
            f"{self.dp} data-parallel rank(s) x {self.grad_accum} accumulation step(s)"
        )
        if self.micro_batch_size != self.requested_micro:
            line += f" (train.micro_batch_size={self.requested_micro} lowered to fit the global batch)"
        return line


def plan_batch(train: TrainConfig, dp: int) -> BatchPlan:
    """The batch plan for `dp` data-parallel ranks; a ConfigError when the global batch cannot be met exactly."""
    micro, wanted = train.micro_batch_size, train.global_batch_size
    if wanted is None:
        return BatchPlan(micro, dp, train.grad_accum, micro)
    if wanted < 1:
        raise ConfigError(f"train.global_batch_size={wanted} must be at least 1")
    if wanted % dp:
        raise ConfigError(
            f"train.global_batch_size={wanted} does not divide over {dp} data-parallel ranks: use a global batch "
            f"that is a multiple of {dp}, or a number of ranks (GPUs / tensor_parallel) that divides {wanted}"
        )
    per_rank = wanted // dp
    used = min(micro, per_rank)
    if per_rank % used:
        fits = max(d for d in range(1, used + 1) if per_rank % d == 0)
        raise ConfigError(
            f"train.global_batch_size={wanted} is not a multiple of train.micro_batch_size={micro} x {dp} "
            f"data-parallel ranks: use a micro_batch_size that divides {per_rank} (e.g. {fits}), or a global "
            f"batch that is a multiple of {micro * dp}"
        )
    accum = per_rank // used
    if train.grad_accum not in (1, accum):
        raise ConfigError(
            f"train.grad_accum={train.grad_accum} contradicts train.global_batch_size={wanted} (which needs "
            f"{accum} at micro-batch {used} x {dp} ranks): set one of them, not both (train.global_batch_size=null)"
        )
    return BatchPlan(used, dp, accum, micro)


def epoch_steps(epochs: float, samples: int, global_batch: int) -> int:
    """Optimizer steps for `epochs` passes over `samples`: whole global batches only, at least one."""
    if epochs <= 0:
        raise ConfigError(f"train.epochs={epochs:g} must be positive")
    return max(1, math.floor(epochs * samples / global_batch))


def warmup_steps(ratio: float, steps: int) -> int:
    """HF Trainer's `get_warmup_steps`: ceil(ratio x steps)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"train.warmup_ratio={ratio:g} must be in [0, 1)")
    return math.ceil(ratio * steps)


def dataset_samples(data: DataConfig) -> int:
    """Samples in data.urls, from the shards' manifest (or tar headers; data.samples_per_shard for remote shards)."""
    from vlm_train.data.sources import expand_urls, shard_sizes

    if data.mixture:
        raise ConfigError(
            "train.epochs counts passes over data.urls and has no meaning with data.mixture: set train.max_steps"
        )
    return sum(shard_sizes(expand_urls(data.urls), data.samples_per_shard))


def resolve_schedule(cfg: Config, dp: int) -> tuple[BatchPlan, str]:
    """Fill in the derived train fields in place (micro_batch_size, grad_accum, max_steps, warmup_steps)
    before the config is written or used; returns the plan and the start-up line that describes it."""
    train = cfg.train
    plan = plan_batch(train, dp)
    train.micro_batch_size, train.grad_accum = plan.micro_batch_size, plan.grad_accum
    line = plan.describe()
    if train.epochs is not None:
        samples = dataset_samples(cfg.data)
        train.max_steps = epoch_steps(train.epochs, samples, plan.global_batch_size)
        line += f"; {train.max_steps} steps = {train.epochs:g} epoch(s) of {samples} samples"
    if train.warmup_ratio is not None:
        train.warmup_steps = warmup_steps(train.warmup_ratio, train.max_steps)
        line += f"; warmup {train.warmup_steps} steps"
    return plan, line
