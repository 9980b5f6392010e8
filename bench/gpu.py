"""vlm_train's trainer against LLaVA's plain transformers + DeepSpeed loop on one GPU: same model,
same initial weights, same batches, one process.

    python bench/gpu.py [--size 7b|2b|toy] [--stage 1|2] [--steps 10] [--warmup 3] [--micro-batch 16]
                        [--zero-stage 2] [--seq-len 2048] [--answer-tokens 600] [--workers 4]
                        [--no-checkpointing] [--out docs/benchmarks.md] [--smoke]
    (PYTHONPATH=. python bench/gpu.py where vlm_train is not installed, e.g. a bare GPU image)

Random weights from config alone (no hub): `7b` is LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336, MLP
projector, Llama-2-7B), `2b` the same tower and a 1.7B Llama-shaped decoder, `toy` the test size;
all with Llama-2's vocabulary (tests/assets/tokenizers/llama2). Data: WebDataset shards written
here (bench/_pipeline.py: a JPEG and 1-3 rounds of conversation per sample, ~700-1800 tokens at the
defaults) through vlm_train's pipeline (vicuna_v1, pad, grouped by modality length, loader workers).
- vlm_train: what `vlm_train.train._train` builds (planner check, model, batches, DeepSpeed engine
  behind TrainEngine), stepped by `Trainer.train_step`;
- baseline: transformers' LlavaForConditionalGeneration around a second build of the same modules
  from the same seed, frozen and checkpointed as LLaVA's train.py does; `engine(..., labels).loss`,
  `engine.backward`, `engine.step` with LLaVA's zero2/zero3.json and torch AdamW (same hyperparameters).
vlm_train runs first and is freed before the baseline is built; each takes its batches from its own
loader over the same shards (checked equal). Every step is timed as the trainer times a logged one:
synchronised at phase edges on GPU. GPU path (torch.cuda.is_available()): bf16, fused AdamW, one
nccl rank, size 7b; CPU path: fp32, gloo, toy, MFU against a measured matmul peak. A side that
fails (out of memory above all) is reported in the table; the other still runs.

Defaults (one rank: ZeRO shards nothing). A 7B full fine-tune holds 16-18 bytes of model states per
parameter (bf16 weights 2, gradients 2-4, fp32 master 4, Adam 8), 109-122 GB before activations:
over an H100, within a few GB of an H200's 141. So `7b` is LLaVA-1.5 stage 1 (projector trains,
tower and decoder frozen), ZeRO-2, checkpointing, micro-batch 16 x 2048: 14.5 GB of states + 24 GB of
activations (vlm_train.plan), which fits an H100 or an H200; `2b` is stage 2 (projector and decoder
train): 32 + 18 GB. `--size 7b --stage 2 --zero-stage 1 --micro-batch 4` plans to 115 GB: H200 only.

Writes the "GPU" section of docs/benchmarks.md when run on a GPU (or into `--out`), only when both
sides ran. `--smoke`: toy size, a few steps, printed, nothing written (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _report  # bench/_report.py and bench/_pipeline.py: this folder is on sys.path
import torch
from _pipeline import write_llava_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames gradient_checkpointing_enable

TOKENIZER = _report.REPO / "tests" / "assets" / "tokenizers" / "llama2"  # Llama-2's vocabulary, no weights
COMMON = (
    *"connector=mlp data=llava-instruct vision.path=null vision.family=clip vision.select_layer=-2".split(),
    *"vision.drop_cls=true vision.freeze=true llm.path=null train.warmup_steps=1 train.min_lr_ratio=0".split(),
    *"train.weight_decay=0 train.log_every=1 train.eval=false".split(),  # log_every=1: every step timed in phases
    f"llm.tokenizer={TOKENIZER}",
)
CLIP_L_336 = tuple(
    "vision.image_size=336 vision.patch_size=14 vision.hidden_size=1024 vision.num_layers=24 vision.num_heads=16 "
    "vision.intermediate_size=4096".split()
)
STAGES = {1: ("llm.freeze=true", "train.lr=1e-3"), 2: ("llm.freeze=false", "train.lr=2e-5")}  # LLaVA-1.5's
PHASES = ("data_wait", "forward", "backward", "optimizer")


def llama(hidden: int, layers: int, heads: int, ffn: int) -> tuple[str, ...]:
    sizes = dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads, intermediate_size=ffn)
    return (*(f"llm.{key}={value}" for key, value in sizes.items()), "llm.max_position_embeddings=4096")


@dataclass(frozen=True)
class Size:
    """A model size and the run defaults chosen for it (see the module docstring)."""

    title: str
    overrides: tuple[str, ...]
    stage: int
    micro_batch: int
    seq_len: int
    answer_tokens: int  # mean answer words (about one Llama token each) per sample
    steps: int
    warmup: int
    workers: int


SIZES = {
    "7b": Size("CLIP ViT-L/14-336 + MLP + Llama-2-7B (LLaVA-1.5-7B)", CLIP_L_336 + llama(4096, 32, 32, 11008),
               1, 16, 2048, 600, 10, 3, 4),
    "2b": Size("CLIP ViT-L/14-336 + MLP + a 1.7B Llama-shaped decoder", CLIP_L_336 + llama(2048, 24, 16, 8192),
               2, 16, 2048, 600, 10, 3, 4),
    "toy": Size("The toy (clip-tiny 48 px + MLP + llama-tiny, Llama-2 vocabulary)", ("train.lr=1e-3",),
                2, 2, 192, 24, 2, 2, 1),  # its own LR: update 3 (the first at LR > 0) shows in step 4's loss
}  # fmt: skip


@dataclass
class Context:
    """What both sides share: the run's config, layout and device, the tokenizer, and the FLOPs
    model (vlm_train/training/flops.py) with the peak that MFU is measured against."""

    cfg: Any
    layout: Any
    device: torch.device
    tokenizer: Any
    flops: Any
    peak_flops: float


def start(args: argparse.Namespace, scratch: Path) -> Context:
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.distributed import init_distributed
    from vlm_train.parallel.engine import resolve_precision
    from vlm_train.parallel.launch_env import launch_env
    from vlm_train.parallel.layout import Layout
    from vlm_train.plan import build_meta_model
    from vlm_train.training.flops import TrainingFlops, peak_flops
    from vlm_train.training.schedule import resolve_schedule

    cfg = compose(
        [*COMMON, *STAGES[args.stage], *SIZES[args.size].overrides, f"run.dir={scratch / 'run'}"]
        + [f"llm.activation_checkpointing={args.checkpointing}", f"parallel.zero_stage={args.zero_stage}"]
        + [f"train.micro_batch_size={args.micro_batch}", "train.max_steps=100000"]  # no decay within the run
        + [f"data.max_length={args.seq_len}", f"data.num_workers={args.workers}", "data.urls=written-below"]
    )
    slot = args.workers * args.micro_batch  # each loader worker gets whole batches
    samples = math.ceil((args.warmup + args.steps) * args.micro_batch / slot) * slot
    cfg.data.urls = write_llava_shards(scratch / "shards", samples, cfg.vision.image_size, args.answer_tokens)
    env = launch_env()
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    device = init_distributed(cfg.parallel, env)
    resolve_schedule(cfg, layout.dp)
    flops = TrainingFlops.of(build_meta_model(cfg))
    peak = peak_flops(device, resolve_precision(cfg.train.precision, device), cfg.train.peak_tflops)
    return Context(cfg, layout, device, load_tokenizer(cfg.llm), flops, peak)


class Taken:
    """A side's batches, passed on; what each held is kept (keys and token sum, lengths, skipped)."""

    def __init__(self, batches):
        self.batches, self.prints, self.lengths, self.skipped = batches, [], [], 0

    def __iter__(self) -> Taken:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.prints.append((tuple(batch["keys"]), int(batch["input_ids"].sum())))
        self.lengths += batch["attention_mask"].sum(dim=1).tolist()
        self.skipped += int(batch["skipped"])
        return batch

    def close(self) -> None:
        """Stop the loader workers; the records stay."""
        self.batches.close()
        self.batches = None


@dataclass
class Step:
    loss: float
    samples: int
    tokens: int  # real (attention-mask) tokens
    flops: float
    phases: dict[str, float]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class VlmTrainSide:
    """vlm_train as `vlm_train.train._train` builds it, stepped by `Trainer.train_step`. The model
    is built on the run's device (a 7B random init takes seconds there, minutes on the host)."""

    name = "vlm_train"

    def __init__(self, ctx: Context):
        from vlm_train.build import build_model
        from vlm_train.parallel.engine import TrainEngine, build_engine
        from vlm_train.plan import check_fits
        from vlm_train.train import build_batches, seed_everything
        from vlm_train.training.loop import Trainer
        from vlm_train.training.metrics import MetricsLogger

        cfg, layout, device = ctx.cfg, ctx.layout, ctx.device
        check_fits(cfg, tp=layout.tp, dp=layout.dp, device=device)  # the trainer's start-up check
        seed_everything(cfg.run.seed)
        with torch.device(device):
            model = build_model(cfg, ctx.tokenizer, layout)
        self.trainable = trainable(model)
        self.batches = Taken(build_batches(cfg, ctx.tokenizer, model, layout, device))
        self.engine = build_engine(model, cfg, layout, device)  # build_train_engine, keeping DeepSpeed's to free
        metrics = MetricsLogger(Path(cfg.run.dir), cfg, enabled=False)
        engine = TrainEngine(self.engine, grad_clip=cfg.train.grad_clip)
        self.trainer = Trainer(engine, self.batches, cfg, layout, device, metrics, ctx.flops)

    def step(self) -> Step:
        loss, samples, tokens = self.trainer.train_step()
        self.trainer.step += 1  # as Trainer.fit counts
        return Step(loss, samples, tokens, self.trainer.step_flops, dict(self.trainer.timer.seconds))


def as_llava(vlm, train_llm: bool, checkpointing: bool):
    """transformers' LlavaForConditionalGeneration holding `vlm`'s modules (the same tensors),
    frozen as LLaVA's train.py does (tower always; decoder in stage 1) and checkpointed as it does."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tower, decoder, projector = vlm.vision.hf_model, vlm.llm.hf_model, vlm.connector
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=decoder.config.to_dict(),
        image_token_index=vlm.image_token_id,
        image_seq_length=vlm.num_image_tokens,
        vision_feature_layer=vlm.vision.select_layer,
        vision_feature_select_strategy="default" if vlm.vision.drop_cls else "full",
    )
    with torch.device("meta"):  # a shell: each of its modules is replaced by vlm_train's
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower, llava.model.language_model, llava.lm_head = tower, decoder.model, decoder.lm_head
    llava.model.multi_modal_projector.linear_1, llava.model.multi_modal_projector.linear_2 = projector[0], projector[2]
    assert not any(t.is_meta for t in [*llava.parameters(), *llava.buffers()]), "a module was left unreplaced"
    llava.requires_grad_(False)
    for module in [llava.model.multi_modal_projector] + [llava.model.language_model, llava.lm_head] * train_llm:
        module.requires_grad_(True)
    if checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llava


def llava_deepspeed_config(cfg, layout, hidden: int, device: torch.device) -> dict:
    """The vlm_train side's batch sizes, precision and LR schedule (the same learning rates step by
    step), with LLaVA's scripts/zero2.json (zero3.json at ZeRO-3) as HF Trainer fills in its "auto"
    values, DeepSpeed's own clipping, and DeepSpeed's default bf16 gradient reduction."""
    from vlm_train.parallel.engine import deepspeed_config, resolve_precision

    config = deepspeed_config(cfg, layout, resolve_precision(cfg.train.precision, device), device.type == "cuda")
    for vlm_train_only in ("communication_data_type", "data_types"):  # train.grad_reduce_dtype=fp32
        config.pop(vlm_train_only, None)
    zero = {"stage": layout.zero_stage, "contiguous_gradients": True, "sub_group_size": 1e9}
    zero |= {"overlap_comm": device.type == "cuda", "reduce_bucket_size": hidden * hidden}
    if layout.zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": int(0.9 * hidden**2), "stage3_param_persistence_threshold": 10 * hidden}
        zero |= {"stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}
    return config | {"gradient_clipping": cfg.train.grad_clip, "zero_optimization": zero}


class BaselineSide:
    """The plain loop of LLaVA's train.py: HF model forward with labels -> loss, DeepSpeed backward/step."""

    name = "baseline"

    def __init__(self, ctx: Context):
        import deepspeed

        from vlm_train.build import build_model
        from vlm_train.train import build_batches, seed_everything
        from vlm_train.training.loop import PhaseTimer

        cfg, device, train = ctx.cfg, ctx.device, ctx.cfg.train
        plain = copy.deepcopy(cfg)
        plain.llm.activation_checkpointing = False  # as_llava enables LLaVA's own
        seed_everything(cfg.run.seed)  # the vlm_train side's initial weights
        with torch.device(device):
            vlm = build_model(plain, ctx.tokenizer, ctx.layout)
        model = as_llava(vlm, train_llm=not cfg.llm.freeze, checkpointing=cfg.llm.activation_checkpointing)
        self.trainable, self.mean_std = trainable(model), (vlm.vision.image_mean, vlm.vision.image_std)
        self.batches = Taken(build_batches(cfg, ctx.tokenizer, vlm, ctx.layout, device))
        params = [p for p in model.parameters() if p.requires_grad]
        adam = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=1e-8, weight_decay=train.weight_decay)
        optimizer = torch.optim.AdamW(params, **adam, fused=device.type == "cuda")  # as build_optimizer's
        config = llava_deepspeed_config(cfg, ctx.layout, vlm.llm.hidden_size, device)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.dtype = next(self.engine.module.parameters()).dtype
        self.device, self.flops, self.timer = device, ctx.flops, PhaseTimer(device)

    def step(self) -> Step:
        from vlm_train.models.vision import normalize_pixels

        timer, device = self.timer, self.device
        timer.start(sync=True)
        with timer.phase("data_wait"):
            batch = next(self.batches)
        with timer.phase("forward"):
            inputs = {name: batch[name].to(device, non_blocking=True) for name in ("input_ids", "attention_mask")}
            labels = batch["labels"].to(device, non_blocking=True)
            pixels = normalize_pixels(batch["pixel_values"].to(device, non_blocking=True), *self.mean_std)
            loss = self.engine(pixel_values=pixels.to(self.dtype), labels=labels, use_cache=False, **inputs).loss
        with timer.phase("backward"):
            self.engine.backward(loss)
        with timer.phase("optimizer"):
            self.engine.step()
        samples, tokens = int(batch["input_ids"].shape[0]), int((batch["attention_mask"] > 0).sum())
        return Step(float(loss.detach()), samples, tokens, self.flops(batch), dict(timer.seconds))


@dataclass
class Result:
    name: str
    steps: list[Step] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's, warm-up ones first
    seconds: float = 0.0
    peak_gb: float | None = None
    trainable: int = 0
    taken: Taken | None = None
    error: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> float | None:
    """Free what a side held; returns the GPU memory still allocated (GB). Loader workers froze the
    objects alive when they forked (gc.freeze): unfrozen first, or their cycles are never collected."""
    gc.unfreeze()
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 1e9


def run_side(side_class, ctx: Context, warmup: int, steps: int) -> Result:
    """Build a side, `warmup` steps, then `steps` timed ones; a failure is kept as its message."""
    result, side, on_gpu = Result(side_class.name), None, ctx.device.type == "cuda"
    try:
        side = side_class(ctx)
        result.trainable, result.taken = side.trainable, side.batches
        if on_gpu:
            torch.cuda.empty_cache()  # the fp32 build, cast to bf16 by DeepSpeed
            torch.cuda.reset_peak_memory_stats(ctx.device)
        result.losses = [side.step().loss for _ in range(warmup)]
        synchronize(ctx.device)
        started = time.perf_counter()
        result.steps = [side.step() for _ in range(steps)]
        synchronize(ctx.device)
        result.seconds = time.perf_counter() - started
        result.losses += [step.loss for step in result.steps]
        result.peak_gb = torch.cuda.max_memory_allocated(ctx.device) / 1e9 if on_gpu else None
    except Exception as err:  # out of memory above all: reported, and the other side still runs
        traceback.print_exc()
        result.steps, result.error = [], f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    finally:
        try:
            if side is not None:
                side.batches.close()
                side.engine.destroy()
        except Exception:
            traceback.print_exc()
        side = None
    return result


def figures(result: Result, peak: float) -> dict[str, float]:
    steps, seconds, count = result.steps, result.seconds, len(result.steps)
    return {
        "tokens": sum(s.tokens for s in steps),
        "tokens/s": sum(s.tokens for s in steps) / seconds,
        "samples/s": sum(s.samples for s in steps) / seconds,
        "MFU": sum(s.flops for s in steps) / seconds / peak,
        "ms/step": 1e3 * seconds / count,
        **{phase: 1e3 * sum(s.phases[phase] for s in steps) / count for phase in PHASES},
    }


HEADER = "| side | tokens | tokens/s | samples/s | MFU | ms/step | data wait | forward | backward | optimizer | peak GB | first loss |"


def table(results: list[Result], peak: float) -> list[str]:
    rows = [HEADER, "|" + "---|" * (HEADER.count(" | ") + 1)]
    done = {r.name: figures(r, peak) for r in results if r.error is None}
    for r in results:
        if r.name not in done:
            rows.append(f"| {r.name} | failed: {str(r.error).replace('|', '/')} |" + " - |" * 10)
            continue
        f = done[r.name]
        cells = [f"{f['tokens']:.0f}", f"{f['tokens/s']:.1f}", f"{f['samples/s']:.2f}", f"{100 * f['MFU']:.2f}%"]
        cells += [f"{f[key]:.1f}" for key in ("ms/step", *PHASES)]
        cells += ["n/a" if r.peak_gb is None else f"{r.peak_gb:.1f}", f"{r.losses[0]:.6f}"]
        rows.append(f"| {r.name} | " + " | ".join(cells) + " |")
    if len(done) == 2:
        ours, base = done["vlm_train"], done["baseline"]
        ratios = [f"{ours[key] / base[key]:.3f}x" if base[key] > 0 else "-" for key in list(ours)[1:]]
        rows.append("| vlm_train / baseline | - | " + " | ".join(ratios) + " | - | - |")
    return rows


def checks(vlm: Result, base: Result) -> list[str]:
    ours, theirs = vlm.taken or Taken(None), base.taken or Taken(None)
    lengths = ours.lengths or theirs.lengths or [0]
    differences = [a - b for a, b in zip(vlm.losses, base.losses)]
    return [
        f"Same batches on both sides: {'yes' if ours.prints == theirs.prints else 'no'} ({len(ours.prints)} and "
        f"{len(theirs.prints)} taken; sample keys and token sums). Tokens per sample: mean "
        f"{sum(lengths) / len(lengths):.0f} (min {min(lengths)}, max {max(lengths)}); {ours.skipped} skipped as bad.",
        f"Losses, step by step (same initial weights, same batches, same updates): max |difference| "
        f"{max(map(abs, differences), default=math.nan):.1e} over {len(differences)} steps.",
        f"Trainable parameters: vlm_train {vlm.trainable:,}, baseline {base.trainable:,}.",
    ]


def peak_basis(ctx: Context) -> str:
    from vlm_train.training.flops import gpu_peak_tflops

    tflops, on_gpu = ctx.peak_flops / 1e12, ctx.device.type == "cuda"
    if on_gpu and gpu_peak_tflops(torch.cuda.get_device_name(ctx.device), "bf16"):
        return f"the {torch.cuda.get_device_name(ctx.device)}'s data-sheet dense bf16 peak, {tflops:.0f} TFLOPS"
    return f"a measured {'bf16' if on_gpu else 'fp32'} matmul peak of {tflops * 1e3:.1f} GFLOPS"


def report(args: argparse.Namespace, ctx: Context, vlm: Result, base: Result, left_gb: float | None) -> str:
    on_gpu = ctx.device.type == "cuda"
    machine = f"; GPU: {torch.cuda.get_device_name(ctx.device)}, CUDA {torch.version.cuda}" if on_gpu else "; CPU"
    trains = "the projector (LLaVA-1.5 stage 1)" if args.stage == 1 else "projector + decoder (LLaVA-1.5 stage 2)"
    both = vlm.error is None and base.error is None
    ratio = figures(vlm, ctx.peak_flops)["tokens/s"] / figures(base, ctx.peak_flops)["tokens/s"] if both else None
    lines = [
        "## GPU",
        "",
        f"{_report.run_details()}{machine}. {SIZES[args.size].title}, random weights, {'bf16' if on_gpu else 'fp32'}, "
        f"ZeRO-{args.zero_stage}, one rank; trains {trains}; activation checkpointing "
        f"{'on' if args.checkpointing else 'off'}; micro-batch {args.micro_batch} of generated LLaVA-1.5-style "
        f"samples (max {args.seq_len} tokens) through vlm_train's data pipeline, loader workers: {args.workers}. "
        "vlm_train: `Trainer.train_step` and its DeepSpeed engine; baseline: transformers' "
        "LlavaForConditionalGeneration on the same modules, initial weights and batches, `engine(..., labels).loss`, "
        f"`engine.backward`, `engine.step` (LLaVA's DeepSpeed config, torch AdamW). {args.warmup} warm-up and "
        f"{args.steps} timed steps per side; phases in ms per step, synchronised at their edges.",
        "",
        *table([vlm, base], ctx.peak_flops),
        "",
        f"**vlm_train / baseline: {ratio:.3f}x tokens/s**" if ratio else "**vlm_train / baseline: not measured**",
        "",
        *checks(vlm, base),
        f"MFU: model FLOPs (vlm_train/training/flops.py: tower, projector, decoder on real tokens) over {peak_basis(ctx)}.",
    ]
    if left_gb is not None:
        lines.append(f"GPU memory still allocated after the vlm_train side was freed: {left_gb:.2f} GB.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size", choices=SIZES, help="default: 7b on a GPU, toy on CPU")
    per_size = ("stage", "steps", "warmup", "micro_batch", "seq_len", "answer_tokens", "workers")
    for name in per_size:
        defaults = ", ".join(f"{size} {getattr(SIZES[size], name)}" for size in SIZES)
        what = "1: the projector trains, 2: the decoder too; " if name == "stage" else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{what}default: {defaults}")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, help="write the section here (default on GPU: docs/benchmarks.md)")
    parser.add_argument("--smoke", action="store_true", help="toy size, a few steps, writes nothing (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.out = "toy", None
    args.size = args.size or ("7b" if torch.cuda.is_available() else "toy")
    for name in per_size:
        if getattr(args, name) is None:
            setattr(args, name, getattr(SIZES[args.size], name))
    if args.stage not in STAGES:
        parser.error(f"--stage {args.stage}: 1 or 2")
    if min(args.steps, args.warmup, args.micro_batch, args.workers) < 1:
        parser.error("--steps, --warmup (the first step's losses are compared), --micro-batch, --workers: at least 1")
    return args


def main() -> int:
    from vlm_train.parallel.distributed import shutdown

    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = start(args, Path(tmp))
        vlm = run_side(VlmTrainSide, ctx, args.warmup, args.steps)
        left_gb = release(ctx.device)
        base = run_side(BaselineSide, ctx, args.warmup, args.steps)
        release(ctx.device)
    section = report(args, ctx, vlm, base, left_gb)
    print(section)
    out = None if args.smoke else args.out or (_report.BENCHMARKS if ctx.device.type == "cuda" else None)
    failed = vlm.error is not None or base.error is not None
    if out is not None and not failed:
        _report.write_section(section, out)
    elif out is not None:
        print(f"not written into {out}: a side failed", file=sys.stderr)
    shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
