"""DeepSpeed glue: the engine config from our train/parallel sections, and the engine itself."""

from __future__ import annotations

import logging

import torch

from vlm_train.config import Config
from vlm_train.parallel.kernels import compile_model, probe_kernels
from vlm_train.parallel.layout import Layout


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


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
    kernels = probe_kernels(device.type)
    if cfg.train.compile:
        compile_model(model, layout.zero_stage)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=SkippableAdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.train.lr,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            eps=1e-8,
            weight_decay=cfg.train.weight_decay,
            **kernels.optimizer_kwargs(),
        ),
        config=deepspeed_config(cfg, layout, precision, on_gpu=device.type == "cuda"),
        mpu=mpu,
    )
    return engine


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose next update can be cancelled.

    The trainer skips a step whose global loss is not finite. Cancelling here, inside whatever
    DeepSpeed wraps around the optimizer, lets every ZeRO stage still reduce, clip and clear the
    gradients as usual, while weights and Adam moments stay exactly as they were. (A torch
    optimizer, not DeepSpeed's fused CPU Adam, which costs a 72 s compile on first use.)
    """

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)
