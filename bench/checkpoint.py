"""Checkpoint save/load seconds and bytes per ZeRO stage, on 2 gloo ranks, and stage-1 size.

    python bench/checkpoint.py [--models toy,100m] [--stages 0,1,2,3] [--out docs/benchmarks.md] [--smoke]

For each model and ZeRO stage, 2 processes build the trainer as vlm_train/train.py does (the
real data pipeline over toy scenes, a DeepSpeed engine), take one training step (so Adam states
exist), time `checkpoint.save` of the trainer's state (DeepSpeed shards + trainer state + atomic
publish), then build a fresh trainer and time `checkpoint.load` (weights_only reads, frozen-weight
checksum). The "stage-1" rows train the connector only (tower and LLM frozen): the checkpoint
should be about trainable params x 16 bytes (fp32 weights, master copy, two Adam moments), not
the model's size. Writes (or replaces) the "Checkpointing" section of the output file
(bench/_report.py) and prints it. `--smoke`: one launch (the toy, full training at ZeRO 1, tower
frozen), the section printed, nothing written (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import _report
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = {
    "toy": ["experiment=toy"],
    # ~100M parameters: a 12-layer, 768-wide Llama decoder behind the toy tower and connector.
    "100m": [
        "experiment=toy",
        "llm.hidden_size=768",
        "llm.num_layers=12",
        "llm.num_heads=12",
        "llm.num_kv_heads=12",
        "llm.intermediate_size=2048",
    ],
}
STAGE1 = ["llm.freeze=true", "vision.freeze=true"]


def worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, shutdown
    from vlm_train.parallel.launch_env import launch_env
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries
    from vlm_train.training import checkpoint

    cfg = compose([*overrides, f"run.dir={run_dir}", "train.precision=fp32", "train.keep_last=0"])
    env = launch_env()
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    _quiet_libraries(rank)
    device = init_distributed(cfg.parallel, env)

    trainer = build_trainer(cfg, layout, device)
    trainer.train_step()  # one optimizer step on a real batch, so Adam states exist
    torch.distributed.barrier()
    started = time.perf_counter()
    folder = checkpoint.save(trainer.engine, Path(run_dir), 1, trainer.trainer_state(), cfg)
    save_s = time.perf_counter() - started
    fresh = build_trainer(cfg, layout, device)
    torch.distributed.barrier()
    started = time.perf_counter()
    checkpoint.load(fresh.engine, folder)
    torch.distributed.barrier()
    load_s = time.perf_counter() - started
    trainer.batches.close()
    fresh.batches.close()
    if rank == 0:
        model = trainer.engine.module
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: whole size
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        size = sum(p.stat().st_size for p in folder.iterdir())
        record = {"save_s": save_s, "load_s": load_s, "bytes": size, "params": total, "trainable": trainable}
        Path(result_file).write_text(json.dumps(record))
    shutdown()


def build_trainer(cfg, layout, device):
    """The Trainer vlm_train/train.py builds: the model, the real data pipeline over `cfg.data`,
    a DeepSpeed engine; metrics off."""
    from vlm_train.build import build_model
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.train import build_batches, seed_everything
    from vlm_train.training.flops import TrainingFlops
    from vlm_train.training.loop import Trainer
    from vlm_train.training.metrics import MetricsLogger

    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.llm)
    model = build_model(cfg, tokenizer, layout)
    batches = build_batches(cfg, tokenizer, model, layout, device)
    flops = TrainingFlops.of(model)  # before DeepSpeed: ZeRO-3 empties partitioned parameters
    engine = build_train_engine(model, cfg, layout, device)
    metrics = MetricsLogger(Path(cfg.run.dir), cfg, enabled=False)
    return Trainer(engine, batches, cfg, layout, device, metrics, flops)


def measure(overrides: list[str], stage: int) -> dict:
    from vlm_train.data.synthetic import generate

    scratch = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result = scratch / "result.json"
        data = generate(scratch / "data", train=20, eval=1)  # toy scenes: a batch of 2 for each rank
        overrides = [*overrides, f"parallel.zero_stage={stage}", f"data.synthetic_dir={data}"]
        overrides += ["data.num_workers=0", "train.micro_batch_size=2"]
        torch.multiprocessing.spawn(worker, args=(2, port, overrides, str(scratch / "run"), str(result)), nprocs=2)
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(rows: list[tuple[str, str, int, dict]]) -> str:
    """The "Checkpointing" section of docs/benchmarks.md: what ran, one row per launch, and what
    the sizes say."""
    lines = [
        "## Checkpointing",
        "",
        f"{_report.run_details()}: 2 gloo ranks, fp32, local disk. Save = DeepSpeed shards + trainer "
        "state + atomic publish; load = a fresh engine reading it back (weights_only, frozen checksum). "
        "Other jobs shared this machine while it ran: seconds are indicative, bytes are exact.",
        "",
        "| model | training | ZeRO | params | trainable | checkpoint MB | size / (trainable x 16 B) | save s | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, kind, stage, r in rows:
        ratio = r["bytes"] / (r["trainable"] * 16)
        lines.append(
            f"| {model} | {kind} | {stage} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e6:.2f}M | "
            f"{r['bytes'] / 1e6:.1f} | {ratio:.2f}x | {r['save_s']:.2f} | {r['load_s']:.2f} |"
        )
    lines += [
        "",
        "`stage-1` trains the connector only: frozen tower and LLM are not written (a SHA-256 in "
        "`frozen.json` references them), so the checkpoint tracks trainable parameters x 16 bytes"
        f"{stage1_example(rows)}. ZeRO 0 and 3 write 12 bytes per parameter (weights + two Adam moments; "
        "fp32 training keeps no separate master copy there), ZeRO 1 and 2 16 bytes (the module's weights "
        "and the optimizer's fp32 partition).",
        "",
    ]
    return "\n".join(lines)


def stage1_example(rows: list[tuple[str, str, int, dict]]) -> str:
    """What freezing saves, in numbers, for the largest model measured in stage 1 (e.g. ": 10.3 MB
    for the 100m model, whose frozen 85M parameters alone are 341 MB in fp32"); "" when none was."""
    stage1 = [r | {"model": model} for model, kind, _, r in rows if kind == "stage-1"]
    if not stage1:
        return ""
    largest = max(stage1, key=lambda r: r["params"])
    frozen = largest["params"] - largest["trainable"]
    return (
        f": {largest['bytes'] / 1e6:.1f} MB for the {largest['model']} model, whose frozen "
        f"{frozen / 1e6:.0f}M parameters alone are {frozen * 4 / 1e6:.0f} MB in fp32"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,100m")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--out", type=Path, default=_report.BENCHMARKS, help="the Markdown file to write into")
    parser.add_argument("--smoke", action="store_true", help="the toy at ZeRO 1 only, writes nothing (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.stages, args.out = "toy", "1", None
    rows = []
    for name in args.models.split(","):
        for stage in map(int, args.stages.split(",")):
            rows.append((name, "full", stage, measure(MODELS[name], stage)))
            print(rows[-1], flush=True)
        if not args.smoke:  # one launch is enough to show that it runs
            rows.append((name, "stage-1", 1, measure([*MODELS[name], *STAGE1], 1)))
            print(rows[-1], flush=True)
    section = report(rows)
    print(section)
    if args.out is not None:
        _report.write_section(section, args.out)


if __name__ == "__main__":
    main()
