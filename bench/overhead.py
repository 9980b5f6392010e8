"""Framework overhead: a vlm_train training step vs a bare PyTorch loop, in the same process.

    python bench/overhead.py [--pairs 150] [--batch 32] [--out docs/benchmarks.md] [--smoke]

Both sides train the same tiny VLM (the toy: CLIP tower frozen, MLP projector, 2-layer Llama)
from the same initial weights on the same fixed batch with the same optimizer (torch AdamW,
gradient clipping at 1.0). The batch is the first one the real data pipeline makes of toy scenes
(the trainer's `build_train_batches`), so it holds every key the trainer reads:
- vlm_train: the real Trainer.train_step (global token counts, token-weighted loss, step-time
  phases, NaN guard) around a real DeepSpeed engine (ZeRO-0, fp32, 1 gloo rank);
- bare: model(...).loss, backward, clip_grad_norm_, AdamW step, zero_grad.
Single steps alternate between the two (which goes first alternates too), so load from other
processes hits both alike; printed: the median of the per-pair time ratios, and the ratio of the
fastest steps (the least disturbed). The batch is fixed (no data loading on either side): this
measures the training step only. Writes (or replaces) the "Overhead" section of the output file
(bench/_report.py) and prints it. `--smoke`: batch 4, 4 pairs, seconds, the section printed,
nothing written (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import _report
import torch
from _pipeline import pipeline_batch  # bench/_pipeline.py: this folder is on sys.path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_sides(batch_size: int, scratch: Path):
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.data.synthetic import generate
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.distributed import init_distributed
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.parallel.launch_env import launch_env
    from vlm_train.parallel.layout import Layout
    from vlm_train.training.flops import TrainingFlops
    from vlm_train.training.loop import Trainer
    from vlm_train.training.metrics import MetricsLogger

    run_dir = scratch / "run"
    overrides = ["experiment=toy", f"run.dir={run_dir}", f"train.micro_batch_size={batch_size}"]
    data = generate(scratch / "data", train=max(20, 2 * batch_size), eval=1)  # toy scenes: 2 batches
    overrides += [f"data.synthetic_dir={data}", "data.num_workers=0"]
    cfg = compose([*overrides, "train.max_steps=100000", "train.warmup_steps=1", "train.log_every=100000"])
    env = launch_env()
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    device = init_distributed(cfg.parallel, env)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.llm)
    model = build_model(cfg, tokenizer, layout)
    bare_model = copy.deepcopy(model)
    batch = pipeline_batch(cfg, tokenizer, model, layout)  # fixed: the step is measured, not data loading
    flops = TrainingFlops.of(model)
    engine = build_train_engine(model, cfg, layout, device)
    metrics = MetricsLogger(run_dir, cfg, enabled=False)
    trainer = Trainer(engine, itertools.repeat(batch), cfg, layout, device, metrics, flops)
    optimizer = torch.optim.AdamW(
        [p for p in bare_model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=1e-8,
        weight_decay=cfg.train.weight_decay,
    )
    # the bare side reads only what a plain forward takes
    inputs = [batch[name] for name in ("pixel_values", "input_ids", "attention_mask", "labels")]

    def bare_step() -> None:
        bare_model(*inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def vlm_step() -> None:
        trainer.train_step()
        trainer.step += 1  # as Trainer.fit counts: later steps are not logged ones (no grad-norm pass, no syncs)

    return vlm_step, bare_step, tuple(batch["input_ids"].shape)


def seconds_per_step(step, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


GOAL = 1.05  # issue 21: vlm_train's step at most 5% slower than the bare loop
BEYOND_THE_BARE_LOOP = (
    "Steps are counted as `Trainer.fit` counts them: only logged steps pay the gradient-norm pass and "
    "the phase synchronisation, and here only the first (a warm-up step) is a logged one. At fp32 "
    "ZeRO-0 DeepSpeed used to flatten, all-reduce over a group of one and copy back every gradient "
    "each step even with one data-parallel rank, and to clip with a Python loop over every tensor plus "
    "an all-reduce of the norm: `TrainEngine` (vlm_train/parallel/engine.py) now switches that "
    "identity all-reduce off at one data-parallel rank (zero-filling the gradients the step did not "
    "reach, as that pass did) and clips with torch's foreach kernels, and the trainer skips its "
    "all-reduces in a world of one (measured before these: 1.097x on 2026-12-02). What is left: "
    "DeepSpeed's bookkeeping around forward, backward and step (its `zero_grad` walks every module "
    "parameter, frozen ones included), and the trainer's token counting and phase timing. Only pairs "
    "of adjacent single steps are compared: on a shared machine, blocks of steps swing widely (blocks "
    "of 10 steps once swung 10x in median)."
)


def report(vlm: list[float], bare: list[float], batch_shape: tuple[int, int]) -> str:
    """The "Overhead" section of docs/benchmarks.md: what ran, the times, the ratio against the
    goal, and what the step costs beyond the bare loop (so a reader knows what the number means)."""
    samples, tokens = batch_shape
    pairs = len(vlm)
    median_ratio = statistics.median(v / b for v, b in zip(vlm, bare))
    fastest_ratio = min(vlm) / min(bare)
    verdict = "met" if median_ratio <= GOAL else "not met"
    return "\n".join(
        [
            "## Overhead",
            "",
            f"{_report.run_details()}: the toy VLM (CLIP tower frozen, MLP projector, 2-layer Llama), fp32, "
            "one gloo rank, on the first batch the real data pipeline makes of toy scenes "
            f"(`vlm_train.train.build_batches`, the trainer's own constructor): {samples} samples x {tokens} "
            "tokens. The vlm_train side is the real `Trainer.train_step` (global token counts, token-weighted "
            "loss, phase timing, NaN guard) around a real DeepSpeed engine (ZeRO-0) behind `TrainEngine`; "
            "the bare side is `model(...).loss.backward()`, `clip_grad_norm_`, torch AdamW `step`, "
            f"`zero_grad` on a copy of the same model, same batch. {pairs} single steps of each, alternating "
            "(and alternating which goes first), after 3 warm-up steps each.",
            "",
            "| | median ms/step | fastest ms/step |",
            "|---|---|---|",
            f"| vlm_train step | {statistics.median(vlm) * 1e3:.1f} | {min(vlm) * 1e3:.1f} |",
            f"| bare PyTorch | {statistics.median(bare) * 1e3:.1f} | {min(bare) * 1e3:.1f} |",
            "",
            f"**vlm_train / bare: {median_ratio:.3f}x** (median of the {pairs} per-pair ratios), "
            f"{fastest_ratio:.3f}x on the fastest steps; goal <= {GOAL:.2f}x (issue 21): {verdict}.",
            "",
            BEYOND_THE_BARE_LOOP,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=_report.BENCHMARKS, help="the Markdown file to write into")
    parser.add_argument("--smoke", action="store_true", help="toy size, a few pairs, writes nothing (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.batch, args.out = 4, 4, None
    with tempfile.TemporaryDirectory() as tmp:
        vlm_step, bare_step, batch_shape = build_sides(args.batch, Path(tmp))
        for _ in range(3):  # warm-up: allocator, first-step optimizer state
            vlm_step(), bare_step()
        vlm, bare = [], []
        for index in range(args.pairs):  # alternate which side goes first within a pair
            first, second = (vlm, bare) if index % 2 == 0 else (bare, vlm)
            for times in (first, second):
                times.append(seconds_per_step(vlm_step if times is vlm else bare_step, 1))
    section = report(vlm, bare, batch_shape)
    print(section)
    if args.out is not None:
        _report.write_section(section, args.out)


if __name__ == "__main__":
    main()
