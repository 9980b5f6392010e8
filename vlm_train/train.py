"""The training entry point: `vlm-train [overrides...]` or `torchrun ... -m vlm_train.train [overrides...]`.

Reads like the run it performs: layout -> data -> model -> engine -> loop -> evaluation.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from vlm_train.config import Config, compose
from vlm_train.errors import UserError
from vlm_train.parallel.signals import Preempted, end_with_launcher
from vlm_train.training import deadline  # noqa: F401  (first: train.max_minutes counts from its import)

USAGE = """usage: vlm-train [key=value ...]

Hydra overrides, for example:
  vlm-train experiment=toy
  vlm-train experiment=toy connector=mlp parallel.zero_stage=2 train.max_steps=200 run.dir=runs/z2
  torchrun --nproc_per_node=2 -m vlm_train.train experiment=toy

Groups: vision, llm, connector, data, parallel, train, experiment (see configs/).
A run.dir holding a complete checkpoint is resumed."""


def main(argv: list[str] | None = None) -> int:
    end_with_launcher()  # first: a launcher that dies during start-up takes this worker with it
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE)
        return 0
    try:
        cfg = compose(overrides)
        run(cfg)
    except UserError as err:
        kind = "" if isinstance(err, Preempted) else "error: "
        print(f"vlm-train: {kind}{err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


def run(cfg: Config) -> None:
    """Train (or resume) the run `cfg` describes, then evaluate on held-out data."""
    from vlm_train.parallel.distributed import exit_failed_rank, init_distributed, shutdown
    from vlm_train.parallel.launch_env import launch_env
    from vlm_train.parallel.layout import Layout
    from vlm_train.training.run_lock import hold_run_dir

    env = launch_env()
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    _quiet_libraries(layout.rank)
    device = init_distributed(cfg.parallel, env)
    try:
        # One job per run dir, checked before anything is written there (training/run_lock.py).
        with hold_run_dir(Path(cfg.run.dir), cfg.run.lock, cfg.run.lock_stale_s, env.rank, env.world):
            _train(cfg, layout, device)
    except Exception as err:
        exit_failed_rank(err, env.world, env.rank)  # multi-rank: ends this process now (dead peers hang a normal exit)
        raise
    finally:
        shutdown()


def _train(cfg: Config, layout, device) -> None:
    import torch.distributed as dist

    from vlm_train.build import build_run_model
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.training.checkpoint import resume_checkpoint
    from vlm_train.training.config_dump import config_yaml
    from vlm_train.training.loop import Trainer
    from vlm_train.training.metrics import MetricsLogger
    from vlm_train.training.pretraining import export_pretrained, flops_of
    from vlm_train.training.resume_check import check_resumable
    from vlm_train.training.schedule import resolve_schedule

    run_dir = Path(cfg.run.dir)
    prepare_synthetic_data(cfg, layout.rank)
    _, batch_line = resolve_schedule(cfg, layout.dp)  # derived fields, before the config is compared or written
    if layout.rank == 0:
        print(batch_line, flush=True)
    resume_from = resume_checkpoint(run_dir)  # collective: `latest`, or the newest older one whose checksums hold
    if resume_from is not None:
        check_resumable((resume_from / "config.yaml").read_text(), cfg, resume_from)
    elif layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))

    mpu = layout.build_groups(cfg.run.seed)  # TP and DP groups, once (megatron backend); DeepSpeed's mpu
    if cfg.objective in VLM_OBJECTIVES:  # vlm-plan's model: a VLM
        check_fits_and_report(cfg, layout, device)  # refuses a layout whose model states cannot fit
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    tokenizer = load_tokenizer(cfg.llm, video=cfg.data.video)
    model = build_run_model(cfg, tokenizer, layout)
    batches = build_batches(cfg, tokenizer, model, layout, device)
    reference = dpo_reference(cfg, model, device)  # before training moves the model
    # before DeepSpeed: ZeRO-3 empties partitioned parameters
    flops = flops_of(model)
    engine = build_train_engine(model, cfg, layout, device, mpu)
    metrics = MetricsLogger(run_dir, cfg, enabled=layout.rank == 0)
    trainer = Trainer(engine, batches, cfg, layout, device, metrics, flops, reference)
    evaluate = EVALUATIONS.get(cfg.objective, evaluate_pretraining)
    if cfg.train.eval and cfg.data.eval_urls:
        trainer.evaluation = lambda: evaluate(trainer, cfg, tokenizer, image_transform(model))
    try:
        if resume_from is not None:
            trainer.resume(resume_from)
        trainer.fit()
    finally:
        batches.close()  # loader workers ignore SIGTERM (signals are the trainer's): end them in order
    if trainer.evaluation is not None:
        trainer.evaluation()
    if cfg.objective not in VLM_OBJECTIVES:
        export_pretrained(trainer, cfg, tokenizer)  # <run.dir>/hf: what llm.path / vision.path load
    dist.barrier()
    metrics.close()


def image_transform(model):
    """The tower's own preprocessing (size, mean, std), for training and evaluation alike; with
    AnyRes, LLaVA-NeXT's tiling (the model normalises the uint8 tiles with the tower's stats)."""
    from vlm_train.data.native_resolution import NativeResolutionTransform
    from vlm_train.data.preprocess import AnyResTransform, ImageTransform

    if model.vision is None:  # pretraining (objective=lm|clip|siglip): its own image size and statistics
        return ImageTransform(model.image_size, model.image_mean, model.image_std)
    if model.native_resolution:  # Qwen-VL: the image at its own size (within min/max pixels), as patches
        vision = model.vision
        tokens_per_second = getattr(vision.hf_model.config, "tokens_per_second", None)  # Qwen2.5-VL's
        return NativeResolutionTransform(
            vision.patch_size,
            vision.merge_size,
            vision.temporal_patch_size,
            vision.min_pixels,
            vision.max_pixels,
            tokens_per_second,
            timestamps=vision.family == "qwen3_vl",
        )
    if model.anyres is not None:
        return AnyResTransform(model.vision.image_size, tuple(map(tuple, model.anyres.grid_pinpoints)))
    return ImageTransform(model.vision.image_size, model.vision.image_mean, model.vision.image_std)


def image_tokens(model):
    """Visual-token slots per image: a number, or with AnyRes (and native resolution) a function of the
    image's size (one slot whatever the size with cross_attention, which reads the visual tokens from
    inside the LLM)."""
    if model.native_resolution:
        return image_transform(model).tokens_of
    if model.anyres is None:
        return model.num_image_tokens
    return model.anyres.num_tokens if model.connector.placement == "sequence" else one_slot


def video_tokens(model):
    """Visual-token slots per video as a function of its frames (None: the model reads no video)."""
    if model.video_token_id is None or model.anyres is None:
        return None
    return model.anyres.video_tokens if model.connector.placement == "sequence" else one_slot


def visual_cost(model):
    """What data.max_visual_tokens counts per image and per video when it is not their slots: with
    cross_attention and AnyRes, the visual tokens its media hold (None: the slots)."""
    if model.anyres is None or model.connector.placement == "sequence":
        return None
    return model.anyres.num_tokens, model.anyres.video_tokens if model.video_token_id is not None else None


def one_slot(_size_or_frames) -> int:
    """cross_attention's slots per image or video: one marks where it occurs."""
    return 1


def build_batches(cfg: Config, tokenizer, model, layout, device):
    """This rank's training batches, exactly as the trainer reads them (the benchmarks take theirs
    from here too, so that a key the trainer needs cannot go missing from theirs)."""
    from vlm_train.data.pipeline import build_train_batches

    return build_train_batches(
        cfg.data,
        tokenizer,
        image_transform(model),
        image_tokens(model),
        video_tokens=video_tokens(model),
        visual_cost=visual_cost(model),
        dp_rank=layout.dp_rank,
        dp_size=layout.dp,
        batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        pin_memory=device.type == "cuda",
    )


def evaluate_run(trainer, cfg: Config, tokenizer, transform) -> None:
    from vlm_train.data.pipeline import SampleEncoder, read_eval_records
    from vlm_train.training.evaluate import evaluate

    assert cfg.data.eval_urls  # the caller checked
    model = trainer.engine.module
    encoder = SampleEncoder(
        cfg.data, tokenizer, transform, image_tokens(model), video_tokens(model), visual_cost(model)
    )
    records = read_eval_records(cfg.data.eval_urls, cfg.data.eval_samples)
    results = evaluate(
        model,
        records,
        encoder,
        batch_size=max(cfg.train.micro_batch_size, 16),
        max_new_tokens=cfg.data.max_new_tokens,
        rank=trainer.layout.dp_rank,
        world=trainer.layout.dp,
        device=trainer.device,
    )
    trainer.metrics.log({"step": trainer.step, **results})


def dpo_reference(cfg: Config, model, device):
    """objective=dpo with more than LoRA training: a frozen copy of the initial model (ZeRO 0-2; at
    ZeRO-3 it would not be sharded, refused); otherwise None (the reference is LoRA-off weights)."""
    import torch

    from vlm_train.errors import ConfigError
    from vlm_train.parallel.engine import run_precision
    from vlm_train.training.dpo import frozen_reference, needs_reference_copy

    if cfg.objective != "dpo" or not needs_reference_copy(model):
        return None
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "objective=dpo with full tuning keeps a frozen copy of the model as its reference, which ZeRO-3 "
            "would not shard: train LoRA only (llm.lora.rank, connector.freeze=true) or use parallel.zero_stage<=2"
        )
    dtype = torch.bfloat16 if run_precision(cfg) == "bf16" else torch.float32
    return frozen_reference(model, device, dtype)


def evaluate_preferences(trainer, cfg: Config, tokenizer, transform) -> None:
    """objective=dpo: held-out preference accuracy of the policy and of its reference, every rank
    scoring every pair (the same forwards on each: ZeRO-3 gathers stay in step)."""
    from vlm_train.data.pipeline import SampleEncoder, read_eval_records
    from vlm_train.data.samples import collate
    from vlm_train.training.dpo import preference_accuracy

    assert cfg.data.eval_urls  # the caller checked
    model = trainer.engine.module
    encoder = SampleEncoder(
        cfg.data, tokenizer, transform, image_tokens(model), video_tokens(model), visual_cost(model)
    )
    pairs = [pair for pair in map(encoder, read_eval_records(cfg.data.eval_urls, cfg.data.eval_samples)) if pair]
    size = cfg.train.micro_batch_size
    batches = (
        trainer.model_inputs(collate(pairs[start : start + size], tokenizer.pad_token_id))
        for start in range(0, len(pairs), size)
    )
    was_training = model.training
    model.eval()
    results = preference_accuracy(model, batches, trainer.reference)
    model.train(was_training)
    trainer.metrics.log({"step": trainer.step, **results})


def evaluate_pretraining(trainer, cfg: Config, tokenizer, transform) -> None:
    """objective=lm: held-out perplexity; clip|siglip: zero-shot retrieval (training/pretraining.py)."""
    from vlm_train.data.pipeline import SampleEncoder
    from vlm_train.training.pretraining import evaluate_perplexity, evaluate_retrieval

    encoder = SampleEncoder(cfg.data, tokenizer, transform, image_tokens=0)
    evaluate = evaluate_perplexity if cfg.objective == "lm" else evaluate_retrieval
    trainer.metrics.log(evaluate(trainer, cfg, encoder))


VLM_OBJECTIVES = ("sft", "dpo")
EVALUATIONS = {"sft": evaluate_run, "dpo": evaluate_preferences}


def check_fits_and_report(cfg: Config, layout, device) -> None:
    """The planner's check (vlm_train/plan.py: model states + activations of this micro-batch),
    then one line on the kernels in use."""
    from vlm_train.parallel.kernels import probe_kernels
    from vlm_train.plan import check_fits

    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # CPU ranks share this machine's RAM
    check_fits(cfg, tp=layout.tp, dp=layout.dp, device=device, ranks_on_node=ranks_on_node)
    if layout.rank == 0:
        print(probe_kernels(device.type).report(cfg.llm.attn_implementation, cfg.data.packing), flush=True)


def prepare_synthetic_data(cfg: Config, rank: int) -> None:
    """Generate the toy scenes on first use (rank 0 writes; the others wait at a barrier)."""
    import torch.distributed as dist

    from vlm_train.data.pipeline import expand_urls

    data = cfg.data
    synthetic_dir = data.synthetic_dir
    wanted = synthetic_dir and data.urls.startswith(str(synthetic_dir))
    if synthetic_dir and wanted and rank == 0 and not (Path(synthetic_dir) / "manifest.json").is_file():
        from vlm_train.data import synthetic, synthetic_video

        print(f"generating synthetic {data.synthetic_layout} data in {synthetic_dir}", flush=True)
        if data.synthetic_layout == "video":
            synthetic_video.generate(synthetic_dir, train=data.synthetic_train, eval=data.synthetic_eval)
        else:
            synthetic.generate(
                synthetic_dir, train=data.synthetic_train, eval=data.synthetic_eval, layout=data.synthetic_layout
            )
    dist.barrier()
    expand_urls(data.urls)  # a pattern that matches nothing fails here, before any model is built
    if data.eval_urls and cfg.train.eval:
        expand_urls(data.eval_urls, key="data.eval_urls")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quiet_libraries(rank: int) -> None:
    """Library chatter (DeepSpeed's banner, HF warnings) stays out of the console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # megatron-core warns at import about absent Transformer Engine/apex and CUDA-only tuning
    warnings.filterwarnings("ignore", module=r"megatron\.core")
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
