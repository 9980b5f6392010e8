"""Checkpoint save/load seconds and bytes per ZeRO stage, on 2 gloo ranks, and stage-1 size.

    python bench/checkpoint.py [--models toy,100m] [--stages 0,1,2,3] [--out docs/benchmarks.md]

For each model and ZeRO stage, 2 processes build the model, take one optimizer step (so Adam
states exist), time `checkpoint.save` (DeepSpeed shards + trainer state + atomic publish), then
build a fresh engine and time `checkpoint.load` (weights_only reads, frozen-weight checksum). The
"stage-1" rows train the connector only (tower and LLM frozen): the checkpoint should be about
trainable params x 16 bytes (fp32 weights, master copy, two Adam moments), not the model's size.
Appends (or replaces) a "Checkpointing" section of the output file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

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
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries, seed_everything
    from vlm_train.training import checkpoint

    cfg = compose([*overrides, f"run.dir={run_dir}", "train.precision=fp32", "train.keep_last=0"])
    env = launch_env()
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    _quiet_libraries(rank)
    device = init_distributed(cfg.parallel, env)

    def fresh_engine():
        seed_everything(cfg.run.seed)
        model = build_model(cfg)
        return model, build_train_engine(model, cfg, layout, device)

    seed_everything(cfg.run.seed)
    vocab_size = build_model(cfg).llm.vocab_size  # read before ZeRO-3 partitions the embedding

    model, engine = fresh_engine()
    engine.backward(engine(*one_batch(model, vocab_size)).loss)
    engine.step()
    state = {"step": 1, "rng": checkpoint.rng_state()}
    torch.distributed.barrier()
    started = time.perf_counter()
    folder = checkpoint.save(engine, Path(run_dir), 1, state, cfg)
    save_s = time.perf_counter() - started
    _, engine = fresh_engine()
    torch.distributed.barrier()
    started = time.perf_counter()
    checkpoint.load(engine, folder)
    torch.distributed.barrier()
    load_s = time.perf_counter() - started
    if rank == 0:
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: whole size
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        size = sum(p.stat().st_size for p in folder.iterdir())
        record = {"save_s": save_s, "load_s": load_s, "bytes": size, "params": total, "trainable": trainable}
        Path(result_file).write_text(json.dumps(record))
    shutdown()


def one_batch(model, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Two samples: the image tokens, then 16 text tokens that are all answer."""
    size = model.vision.image_size
    pixels = torch.randn(2, 3, size, size)
    text = torch.randint(4, vocab_size, (2, 16))
    text[text == model.image_token_id] = model.image_token_id - 1 if model.image_token_id > 4 else 5
    images = torch.full((2, model.num_image_tokens), model.image_token_id)
    input_ids = torch.cat([images, text], dim=1)
    labels = torch.cat([torch.full_like(images, -100), text], dim=1)
    return pixels, input_ids, torch.ones_like(input_ids), labels


def measure(overrides: list[str], stage: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result = scratch / "result.json"
        args = (2, port, [*overrides, f"parallel.zero_stage={stage}"], str(scratch / "run"), str(result))
        torch.multiprocessing.spawn(worker, args=args, nprocs=2)
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(rows: list[tuple[str, str, int, dict]]) -> str:
    lines = [
        "## Checkpointing",
        "",
        f"`python bench/checkpoint.py` on {platform.machine()} with {os.cpu_count()} cores, "
        f"{datetime.date.today()}, 2 gloo ranks, fp32, local disk. Save = DeepSpeed shards + trainer "
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
        "`frozen.json` references them), so the checkpoint tracks trainable parameters x 16 bytes.",
        "",
    ]
    return "\n".join(lines)


def write_section(out: Path, section: str) -> None:
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    start = text.find("## Checkpointing")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,100m")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for stage in map(int, args.stages.split(",")):
            rows.append((name, "full", stage, measure(MODELS[name], stage)))
            print(rows[-1], flush=True)
        rows.append((name, "stage-1", 1, measure([*MODELS[name], *STAGE1], 1)))
        print(rows[-1], flush=True)
    section = report(rows)
    print(section)
    write_section(args.out, section)


if __name__ == "__main__":
    main()
