"""Everything DeepSpeed: the engine config from our train/parallel sections, the engine itself, and
`TrainEngine`, the small interface the trainer and the checkpointer call instead of DeepSpeed's
engine (its checkpoint files, resharding and gathering are in parallel/engine_checkpoint.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlm_train.config import Config, TrainConfig
from vlm_train.errors import ConfigError
from vlm_train.parallel.engine_checkpoint import HostBuffers, PendingFile, capture_save
from vlm_train.parallel.kernels import Kernels, compile_model, probe_kernels
from vlm_train.parallel.layout import Layout


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def run_precision(cfg: Config) -> str:
    """`train.precision` resolved for the device this run will train on (auto: bf16 on GPUs),
    before that device exists: the megatron decoder is built for it (build.py)."""
    from vlm_train.parallel.distributed import pick_backend

    on_gpu = pick_backend(cfg.parallel) == "nccl"  # init_distributed's rule for the device
    return resolve_precision(cfg.train.precision, torch.device("cuda" if on_gpu else "cpu"))


def gradient_dtypes(precision: str, grad_reduce_dtype: str, zero_stage: int) -> dict:
    """DeepSpeed's keys for the dtype gradients accumulate and are reduced in under bf16.

    fp32 (Megatron's choice) asks for fp32 all-reduce / reduce-scatter (`communication_data_type`)
    at every stage and, at ZeRO 2-3, fp32 accumulation (`data_types.grad_accum_dtype`): fp32
    gradient partitions that each micro-batch's reduced gradients are added into. bf16 spells out
    DeepSpeed's own default. Not asked at ZeRO 0-1 (see `precision_notes`): DeepSpeed 0.19 refuses
    bf16 weights with fp32 accumulation without ZeRO (NotImplementedError), and at ZeRO-1 it
    switches to its BF16_Optimizer, whose checkpoints its own zero_to_fp32 cannot read (export).
    """
    if precision != "bf16":
        return {}  # fp32 weights: gradients are fp32 throughout
    dtypes: dict = {"communication_data_type": grad_reduce_dtype}
    if zero_stage >= 2:
        dtypes["data_types"] = {"grad_accum_dtype": grad_reduce_dtype}
    return dtypes


def precision_notes(precision: str, grad_reduce_dtype: str, zero_stage: int) -> list[str]:
    """What a bf16 run cannot do as asked, in words (logged once at start-up); empty when nothing."""
    if precision == "bf16" and grad_reduce_dtype == "fp32" and zero_stage <= 1:
        return [
            f"bf16 at ZeRO-{zero_stage}: gradients accumulate across micro-batches in bf16 and the all-reduced sum is "
            "stored back in bf16; only the all-reduce itself adds in fp32. parallel.zero_stage=2 or 3 accumulates "
            "and reduces in fp32 (docs/performance.md, Precision)"
        ]
    return []


def adapter_clips(precision: str, zero_stage: int) -> bool:
    """fp32 at ZeRO-0: `TrainEngine` clips the gradients itself (DeepSpeed is given no clipping).
    DeepSpeed's clipping there is a Python loop over every tensor plus an all-reduce of the norm
    over the data-parallel group each step; the adapter uses torch's foreach kernels, and the norm
    it computes is the one logged. ZeRO 1-3 and bf16 keep DeepSpeed's (their optimizers clip their
    own partitions)."""
    return precision == "fp32" and zero_stage == 0


def deepspeed_config(cfg: Config, layout: Layout, precision: str, on_gpu: bool = False) -> dict:
    """ZeRO stage, batch sizes, warmup + cosine, clipping and precision for DeepSpeed."""
    train = cfg.train
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * layout.dp,
        "gradient_clipping": 0.0 if adapter_clips(precision, layout.zero_stage) else train.grad_clip,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": max(1, train.warmup_steps),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": train.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero_config(cfg, layout.zero_stage, on_gpu),
        "bf16": {"enabled": precision == "bf16"},
        **gradient_dtypes(precision, train.grad_reduce_dtype, layout.zero_stage),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_config(cfg: Config, stage: int, on_gpu: bool) -> dict:
    """DeepSpeed's `zero_optimization` section."""
    # Overlapping the gradient reduction with backward pays on GPUs (NCCL on its own stream);
    # on CPU/gloo there is nothing to overlap with.
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    threshold = cfg.parallel.zero3_persistence_threshold
    if stage == 3 and threshold is not None:
        zero["stage3_param_persistence_threshold"] = threshold
    return zero


def build_train_engine(
    model: torch.nn.Module, cfg: Config, layout: Layout, device: torch.device, mpu: Any = None
) -> TrainEngine:
    """`build_engine` behind the trainer's interface (`TrainEngine`)."""
    return TrainEngine(build_engine(model, cfg, layout, device, mpu), grad_clip=cfg.train.grad_clip)


def build_engine(model: torch.nn.Module, cfg: Config, layout: Layout, device: torch.device, mpu: Any = None) -> Any:
    """Wrap the model in a DeepSpeed engine; only parameters that train reach the optimizer.

    `mpu` (from `Layout.build_groups`) is required at TP > 1: without it DeepSpeed reduces
    gradients over the TP ranks too and trains wrong without an error.
    """
    import deepspeed

    if layout.tp > 1 and mpu is None:
        raise RuntimeError("tensor parallel without DeepSpeed's mpu computes wrong gradients")

    deepspeed.utils.logger.setLevel(logging.ERROR)  # its per-step INFO/WARNING lines drown the progress
    precision = resolve_precision(cfg.train.precision, device)
    if layout.rank == 0 and (layout.dp > 1 or cfg.train.grad_accum > 1):  # else nothing accumulates or reduces
        for note in precision_notes(precision, cfg.train.grad_reduce_dtype, layout.zero_stage):
            logging.getLogger(__name__).warning(note)
    _check_decoder_precision(model, precision)
    kernels = probe_kernels(device.type)
    if cfg.train.compile:
        compile_model(model, layout.zero_stage)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train, kernels),
        config=deepspeed_config(cfg, layout, precision, on_gpu=device.type == "cuda"),
        mpu=mpu,
    )
    return engine


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig, kernels: Kernels) -> torch.optim.Optimizer:
    """train.optimizer: AdamW (the recipes), or plain SGD, whose update is proportional to the
    gradient, so a wrong loss divisor shows in the weights (Adam's normalised update hides it)."""
    if train.optimizer == "sgd":
        return SkippableSGD(params, lr=train.lr, weight_decay=train.weight_decay)
    return SkippableAdamW(
        params,
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=1e-8,
        weight_decay=train.weight_decay,
        **kernels.optimizer_kwargs(),
    )


def _check_decoder_precision(model: torch.nn.Module, precision: str) -> None:
    # A megatron decoder built for fp32 but run in bf16 would skip its fp32 softmax silently.
    gpt = getattr(getattr(model, "llm", None), "gpt", None)
    if gpt is not None and gpt.config.bf16 != (precision == "bf16"):
        raise RuntimeError(f"the megatron decoder was built for bf16={gpt.config.bf16} but the run is {precision}")


class SkipNextStep:
    """Mixin for a torch optimizer: setting `skip_next` cancels its next update.

    The trainer skips a step whose global loss is not finite. Cancelling here, inside whatever
    DeepSpeed wraps around the optimizer, lets every ZeRO stage still reduce, clip and clear the
    gradients as usual, while weights and optimizer state stay exactly as they were.
    """

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)  # the torch optimizer it is mixed into


class SkippableAdamW(SkipNextStep, torch.optim.AdamW):
    """torch's AdamW (not DeepSpeed's fused CPU Adam, which costs a 72 s compile on first use)."""


class SkippableSGD(SkipNextStep, torch.optim.SGD):
    """torch's SGD (no momentum): its update is proportional to the gradient."""


def _skip_identity_allreduce(engine: Any) -> bool:
    """Switch off DeepSpeed's gradient all-reduce where it is an identity: ZeRO-0 with the plain
    optimizer (no ZeRO or bf16 wrapper, which keep gradients of their own) and one data-parallel
    rank. DeepSpeed would still flatten every gradient, all-reduce it over a group of one and copy
    it back, each step (~9% of the toy step, bench/overhead.py). True when switched off: the
    caller must then give every trainable parameter without a gradient a zero one before the
    update, as that pass does (AdamW steps a zero gradient: decay and moments move; it skips None).
    """
    plain = engine.optimizer is engine.basic_optimizer and engine.zero_optimization_stage() == 0
    if not (plain and engine.seq_dp_world_size == 1 and engine.enable_backward_allreduce):
        return False
    engine.enable_backward_allreduce = False
    return True


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.nn.utils.get_total_norm(grads).double() ** 2


def _fill_missing_grads(trainable: list[torch.nn.Parameter]) -> None:
    """What DeepSpeed's ZeRO-0 reduction does to a trainable parameter the step did not reach."""
    for param in trainable:
        if param.grad is None and param.numel() > 0:
            param.grad = torch.zeros_like(param)


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step did: `updated` is False when the update was cancelled (asked for, or
    by DeepSpeed itself on a non-finite gradient norm); `grad_norm` is the norm of the step's
    gradients before clipping, when it was asked for and the update happened."""

    updated: bool
    grad_norm: float | None = None


class TrainEngine:
    """The engine as the trainer and the checkpointer see it; DeepSpeed stays behind it.

    Training:
        engine.begin_micro_batch(last)  before each micro-batch: is it the step's last?
        engine(**inputs)                the model's forward (DeepSpeed's module wrapper)
        engine.backward(loss)           back-propagate one micro-batch (DeepSpeed scales by 1/grad_accum,
                                        accumulates, and reduces over data-parallel ranks at the step's
                                        last micro-batch)
        engine.micro_step()             after each backward but the step's last (DeepSpeed's bookkeeping)
        engine.step(skip, grad_norm)    after the last backward: update the weights, or with skip=True
                                        cancel the update -> StepResult(updated, grad_norm)
        engine.lr                       the learning rate of the next update
    Model and layout:
        engine.module, engine.zero_stage, engine.tensor_parallel, engine.model_parallel_group
    Checkpoints (files in DeepSpeed's layout; frozen parameters left out):
        engine.save(root, tag, snapshot)
                                        collective: this rank's shards for root/tag as files still to
                                        write (a copy in `snapshot`'s host buffers when given)
        engine.load(folder, saved_ranks, saved_stage)
                                        collective: every read weights_only; a checkpoint of another
                                        rank count or ZeRO stage is resharded (universal checkpoint)
        has_engine_state, consolidated_state_dict, full_tensor, full_fp32, safe_torch_load
                                        (parallel/engine_checkpoint.py: whole weights without an engine)

    fp32 ZeRO-0 (`adapter_clips`): the adapter clips the gradients itself with foreach kernels (the
    norm it logs is that one), and with one data-parallel rank switches off DeepSpeed's gradient
    all-reduce, an identity there, doing what else that pass did (a zero gradient for a trainable
    parameter the step did not reach).

    Skipping a step (the only place that knows how): the caller decides that the step's global
    loss is not finite and asks `step(skip=True)`. The optimizer (a `SkipNextStep`) then cancels
    its own update inside whatever DeepSpeed wraps around it, so every ZeRO stage still reduces,
    clips and clears the gradients while weights and optimizer state stay as they were. ZeRO 1-3
    may cancel the update first, seeing a non-finite gradient norm (an "overflow"): it then counts
    a skipped step and leaves its LR schedule behind, which is stepped here so that the schedule
    follows the trainer's step count either way.
    """

    def __init__(self, engine: Any, grad_clip: float = 0.0):
        self._engine = engine
        self._optimizer = engine.basic_optimizer
        if not isinstance(self._optimizer, SkipNextStep):
            raise TypeError(f"{type(self._optimizer).__name__} cannot cancel a step: build it with build_optimizer")
        self._plain = engine.optimizer is engine.basic_optimizer and self.zero_stage == 0  # adapter_clips
        if self._plain and engine.gradient_clipping() > 0:
            raise RuntimeError("fp32 ZeRO-0: the adapter clips; build DeepSpeed's config with deepspeed_config")
        self._grad_clip = grad_clip if self._plain else 0.0  # else DeepSpeed clips (ZeRO 1-3, bf16)
        self._fills_missing_grads = _skip_identity_allreduce(engine)
        # ZeRO-0 keeps its parameter objects: listed once (a walk of the module tree costs ~1 ms a step)
        self._trainable = [p for p in engine.module.parameters() if p.requires_grad] if self.zero_stage == 0 else []

    @property
    def module(self) -> torch.nn.Module:
        """The model DeepSpeed wraps (parameters partitioned under ZeRO-3)."""
        return self._engine.module

    @property
    def zero_stage(self) -> int:
        return int(self._engine.zero_optimization_stage())

    @property
    def tensor_parallel(self) -> int:
        mpu = self._engine.mpu
        return 1 if mpu is None else int(mpu.get_model_parallel_world_size())

    @property
    def model_parallel_group(self) -> dist.ProcessGroup | None:
        """The tensor-parallel group of this rank; None without tensor parallelism."""
        return self._engine.mpu.get_model_parallel_group() if self.tensor_parallel > 1 else None

    @property
    def lr(self) -> float:
        return float(self._engine.get_lr()[0])

    def __call__(self, *inputs: torch.Tensor, **named: torch.Tensor) -> Any:
        return self._engine(*inputs, **named)

    def begin_micro_batch(self, last: bool) -> None:
        """Before each micro-batch's forward: whether it is the step's last, the one whose backward
        reduces the gradients. A step may run any number of micro-batches (data.max_tokens_per_batch
        splits loaded batches), as long as every data-parallel rank runs the same number."""
        self._engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def micro_step(self) -> None:
        """After the backward of a micro-batch that is not the last of its step."""
        assert not self._engine.is_gradient_accumulation_boundary(), "the step's last micro-batch: call step()"
        self._engine.step()

    def step(self, skip: bool = False, grad_norm: bool = False) -> StepResult:
        """After the backward of the step's last micro-batch: reduce, clip and apply the update, or
        with `skip` cancel it (see the class docstring). `grad_norm` asks for the gradient norm
        (at ZeRO-0 a pass over every gradient, so only when it is logged)."""
        engine = self._engine
        assert engine.is_gradient_accumulation_boundary(), "not the step's last micro-batch: call micro_step()"
        if self._fills_missing_grads:
            _fill_missing_grads(self._trainable)
        # ZeRO-0: DeepSpeed reports no norm; at fp32 the adapter clips (adapter_clips), so has it.
        norm = None
        if self.zero_stage == 0 and not skip and (grad_norm or self._grad_clip > 0):
            norm = self._clip_whole_grads(self._grad_clip)
        skipped_before = engine.skipped_steps
        self._optimizer.skip_next = skip
        try:
            engine.step()
        finally:
            self._optimizer.skip_next = False  # not consumed when DeepSpeed cancelled the update first
        if engine.skipped_steps > skipped_before:
            # DeepSpeed cancelled the update itself (ZeRO 1-3 on a non-finite gradient norm; ZeRO-0
            # has only SkipNextStep) and left its LR schedule behind: keep it in step with the trainer.
            engine.lr_scheduler.step()
            return StepResult(updated=False)
        if skip:
            return StepResult(updated=False)
        if not grad_norm:
            return StepResult(updated=True)
        if self.zero_stage > 0:
            reported = engine.get_global_grad_norm()
            return StepResult(updated=True, grad_norm=None if reported is None else float(reported))
        return StepResult(updated=True, grad_norm=None if norm is None else float(norm))

    def _clip_whole_grads(self, max_norm: float) -> torch.Tensor:
        """The norm of the step's gradients, which at ZeRO-0 are reduced and whole on every rank
        except the decoder's tensor-parallel shards: their squares are summed over the TP group,
        everything replicated across it (tower, connector, norms) is counted once. With `max_norm`
        > 0 the gradients are then scaled by min(1, max_norm / (norm + 1e-6)), as torch and
        DeepSpeed clip. Foreach kernels, no host sync."""
        params = [param for param in self._trainable if param.grad is not None]
        sharded = _squared_norm(
            [p.grad for p in params if getattr(p, "tensor_model_parallel", False)], self._engine.device
        )
        if self.tensor_parallel > 1:
            dist.all_reduce(sharded, group=self.model_parallel_group)
        replicated = _squared_norm(
            [p.grad for p in params if not getattr(p, "tensor_model_parallel", False)], self._engine.device
        )
        norm = (sharded + replicated).sqrt()
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.float())
        return norm

    def save(self, root: Path, tag: str, snapshot: HostBuffers | None = None) -> list[PendingFile]:
        """Collective: this rank's part of the engine state for root/tag, as files still to write
        (the caller writes them: hashed and fsynced, training/checkpoint.py). With `snapshot` the
        state is a copy in those host buffers that later steps do not change (the previous
        snapshot's buffers are reused: write its files first); without, the live state, to be
        written before the next step."""
        return capture_save(self._engine, root, tag, snapshot_into=snapshot)

    def load(self, folder: Path, saved_ranks: int, saved_stage: int) -> None:
        """Collective: restore the engine state from `folder`, saved by `saved_ranks` ranks at ZeRO
        `saved_stage`. Every file is read with weights_only=True. The frozen parameters are not in
        the checkpoint: the rebuilt ones stay (the caller checks their checksum)."""
        from vlm_train.parallel.engine_checkpoint import guard_loads, load_resharded

        guard_loads(self._engine)
        if (saved_ranks, saved_stage) == (dist.get_world_size(), self.zero_stage):
            _, client = self._engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
        else:
            client = load_resharded(self._engine, folder, saved_ranks, saved_stage)
        if client is None:
            raise ConfigError(f"{folder} could not be loaded by DeepSpeed: is it a vlm_train checkpoint?")
