"""DeepSpeed glue: the engine config from our train/parallel sections, and the engine itself."""

from __future__ import annotations

import logging

import torch

from vlm_train.config import Config, TrainConfig
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


def deepspeed_config(cfg: Config, layout: Layout, precision: str, on_gpu: bool = False) -> dict:
    """ZeRO stage, batch sizes, warmup + cosine, clipping and precision for DeepSpeed."""
    train = cfg.train
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * layout.dp,
        "gradient_clipping": train.grad_clip,
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
        # Overlapping the gradient reduction with backward pays on GPUs (NCCL on its own stream);
        # on CPU/gloo there is nothing to overlap with.
        "zero_optimization": {"stage": layout.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu},
        "bf16": {"enabled": precision == "bf16"},
        **gradient_dtypes(precision, train.grad_reduce_dtype, layout.zero_stage),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: Config, layout: Layout, device: torch.device, mpu=None):
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
        return super().step(closure)


class SkippableAdamW(SkipNextStep, torch.optim.AdamW):
    """torch's AdamW (not DeepSpeed's fused CPU Adam, which costs a 72 s compile on first use)."""


class SkippableSGD(SkipNextStep, torch.optim.SGD):
    """torch's SGD (no momentum): its update is proportional to the gradient."""
