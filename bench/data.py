"""Data pipeline throughput: our WebDataset path against a plain PIL loop, in the same process.

    python bench/data.py [--samples 1024] [--rounds 6] [--batch-size 16] [--step-rate 1 2 4 8] [--smoke]

Both paths do the same work per sample at 336 px (CLIP ViT-L/14-336: 576 visual tokens):
decode a 640x480 JPEG, resize + centre-crop to uint8 (vlm_train.data.preprocess; the model
normalises on the device), chat
template + tokenize (the toy tokenizer), collate into batches.
- ours: shards written by `vlm-shards llava`, read by vlm_train.data.pipeline exactly as training
  reads them, with one DataLoader worker process (and once more in-process, without the worker);
- plain: a loop over the same records and JPEG files in a folder, PIL + the same transform and
  tokenizer + the same collate, no WebDataset.
Rounds alternate (ours, plain, ...) so that load from other processes hits every path alike; the
ratio is the median of the per-round ratios. Every process runs one thread, and "per core" counts
CPU seconds of all of a path's processes (the worker included). Writes the "Data pipeline"
section of docs/benchmarks.md (other sections of that file are left as they are). `--smoke`: 32
records, one round, nothing written (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, PATCH = 336, 14
SECTION = "## Data pipeline"


def make_dataset(folder: Path, count: int) -> list[dict]:
    """`count` LLaVA records over 640x480 JPEGs (synthetic scenes, upscaled, with sensor-like
    noise so that they compress like photos), written to `folder/images` and `folder/data.json`."""
    import numpy as np
    from PIL import Image

    from vlm_train.data.synthetic import make_sample

    rng, noise = random.Random(0), np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(count):
        png, record = make_sample(rng)
        scene = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((640, 480), Image.BICUBIC), np.float32)
        photo = np.clip(scene + noise.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(images / f"{i:06d}.jpg", quality=90)
        records.append({"id": str(i), "image": f"{i:06d}.jpg", "conversations": record["conversations"]})
    (folder / "data.json").write_text(json.dumps(records))
    return records


def convert(folder: Path, workers: int) -> tuple[str, float]:
    """Shards via `vlm-shards llava`; returns (data.urls pattern, conversion samples/s)."""
    from vlm_train.data.shards import main

    count = len(json.loads((folder / "data.json").read_text()))
    start = time.perf_counter()
    args = ["llava", "--json", str(folder / "data.json"), "--images", str(folder / "images")]
    if main([*args, "--out", str(folder / "shards"), "--max-count", "64", "--workers", str(workers)]) != 0:
        sys.exit("vlm-shards failed")
    seconds = time.perf_counter() - start
    shards = sorted(p.name for p in (folder / "shards").glob("shard-*.tar"))
    return str(folder / "shards" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar"), count / seconds


class Clock:
    """Wall time, CPU time and its kernel part, of this process and its finished children
    (DataLoader workers): CPU seconds are what a path costs, however busy the machine was."""

    def __init__(self):
        self.wall, (self.cpu, self.kernel) = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> tuple[float, float]:
        mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        kernel = mine.ru_stime + children.ru_stime
        return mine.ru_utime + children.ru_utime + kernel, kernel

    def stop(self) -> tuple[float, float, float]:
        cpu, kernel = self._cpu()
        return time.perf_counter() - self.wall, cpu - self.cpu, kernel - self.kernel


class Ours:
    """One epoch of our pipeline per round, with `workers` DataLoader workers (0: in-process)."""

    def __init__(self, urls: str, batch_size: int, workers: int, tokenizer, transform):
        from vlm_train import compose
        from vlm_train.data.pipeline import build_train_batches

        overrides = [f"data.urls={urls}", f"data.num_workers={workers}", "data.max_length=1024"]
        cfg = compose(["experiment=toy", *overrides]).data
        tokens = (IMAGE_SIZE // PATCH) ** 2
        self.batches = build_train_batches(
            cfg, tokenizer, transform, tokens, dp_rank=0, dp_size=1, batch_size=batch_size, seed=0
        )

    def round(self) -> tuple[int, float, float, float]:
        # A fresh loader per round, started inside the timing: no batches prefetched while the
        # other path was being timed. The epoch's end drops the loader, which joins its worker,
        # so the worker's CPU time is in RUSAGE_CHILDREN when the round ends.
        self.batches.load_state_dict(self.batches.state_dict())
        clock = Clock()
        samples = sum(len(next(self.batches)["keys"]) for _ in range(self.batches.batches_per_epoch))
        return samples, *clock.stop()


class Plain:
    """The loop one writes without a data library: PIL + the same transform, tokenizer, collate."""

    def __init__(self, folder: Path, records: list[dict], batch_size: int, tokenizer, transform):
        self.folder, self.records, self.batch_size = folder, records, batch_size
        self.tokenizer, self.transform = tokenizer, transform

    def round(self) -> tuple[int, float, float, float]:
        from PIL import Image

        from vlm_train.data.pipeline import collate
        from vlm_train.data.templates import encode, truncate

        image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        clock, samples = Clock(), 0
        usable = len(self.records) - len(self.records) % self.batch_size
        for first in range(0, usable, self.batch_size):
            batch = []
            for record in self.records[first : first + self.batch_size]:
                with Image.open(self.folder / "images" / record["image"]) as image:
                    pixels = self.transform(image).unsqueeze(0)
                encoded = encode(record["conversations"], self.tokenizer, "chat", (IMAGE_SIZE // PATCH) ** 2)
                batch.append((record["id"], pixels, truncate(encoded, 1024, image_id)))
            samples += len(collate(batch, self.tokenizer.pad_token_id)["keys"])
        return samples, *clock.stop()


def measure(paths: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per round and path: samples per CPU second ("core") and per wall second, paths alternating."""
    rates: dict[str, dict[str, list[float]]] = {name: {"core": [], "wall": [], "kernel": []} for name in paths}
    for index in range(rounds):
        for name, path in paths.items():
            samples, wall, cpu, kernel = path.round()
            rates[name]["core"].append(samples / cpu)
            rates[name]["wall"].append(samples / wall)
            rates[name]["kernel"].append(kernel / cpu)
            print(f"round {index + 1}: {name:<18} {samples / cpu:7.1f} samples/s per core, {samples / wall:7.1f} wall")
    return rates


def workers_needed(rate: float, step_rate: float, batch_size: int) -> int:
    return math.ceil(step_rate * batch_size / rate)


def _ratio(rates: dict, name: str, kind: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[name][kind], rates["plain loop"][kind]))


def report(args, rates: dict, convert_rate: float, mean_kb: float) -> str:
    ours = statistics.median(rates["ours (1 worker)"]["core"])
    lines = [
        SECTION,
        "",
        f"`python bench/data.py --samples {args.samples} --rounds {args.rounds} --batch-size {args.batch_size}` "
        f"on {platform.machine()} with {os.cpu_count()} cores, {datetime.date.today()}, "
        f"Python {platform.python_version()}: {args.samples} LLaVA records over 640x480 JPEGs (mean "
        f"{mean_kb:.0f} kB) -> {IMAGE_SIZE} px, chat template, toy tokenizer, batches of {args.batch_size}. "
        "Per core = samples per CPU second of every process of the path (the worker included), one thread each.",
        "",
        "| path | samples/s per core | vs plain | samples/s wall | vs plain | kernel CPU | per core, each round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rates.items():
        each = ", ".join(f"{x:.1f}" for x in r["core"])
        core, wall = statistics.median(r["core"]), statistics.median(r["wall"])
        lines.append(
            f"| {name} | {core:.1f} | {_ratio(rates, name, 'core'):.2f}x | {wall:.1f} "
            f"| {_ratio(rates, name, 'wall'):.2f}x | {statistics.median(r['kernel']):.0%} | {each} |"
        )
    lines += [
        "",
        f"**Ours (1 worker) / plain loop: {_ratio(rates, 'ours (1 worker)', 'core'):.2f}x per core** "
        f"({_ratio(rates, 'ours (1 worker)', 'wall'):.2f}x in wall time); goal >= 0.9x. Medians of per-round "
        "ratios, rounds interleaved (ours, plain, ours in-process, ...). This machine was shared "
        "with other jobs while it ran: rates swing from round to round, so compare within a round.",
        "",
        f"The pipeline's own work (read tar -> decode -> preprocess -> tokenize -> collate, in-process) runs at "
        f"{_ratio(rates, 'ours (in-process)', 'core'):.2f}x the plain loop per core. What the 1-worker path "
        "adds is the DataLoader worker: its start once per epoch (a fork, its first touch of memory, its "
        "exit; each round here is one epoch, so one start per round) and the hand-over of each batch. "
        "Pixels travel as uint8 (the model normalises them on the device) through a few shared-memory "
        "slots per worker that are written batch after batch (vlm_train/data/transfer.py); the trainer "
        "reads them in place. With a fresh segment per batch instead, as torch's collate makes, every "
        "page of every batch was a page fault in the worker: 0.88x per core at 512 records per round "
        "(and 0.78x with float32 pixels, 4x the bytes).",
        "",
        f"DataLoader workers (one core each) that feed a step rate at {ours:.1f} samples/s per worker:",
        "",
        "| steps/s | samples per step per rank | workers per rank |",
        "|---|---|---|",
    ]
    for step_rate in args.step_rate:
        lines.append(f"| {step_rate:g} | {args.batch_size} | {workers_needed(ours, step_rate, args.batch_size)} |")
    lines += [
        "",
        f"`vlm-shards llava` converted the {args.samples} records at {convert_rate:.0f} samples/s (wall) with "
        f"{args.convert_workers} worker processes; it checks every record and decodes every image once.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of `path` (or append it); other sections stay as they are."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="records; one epoch of them per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step per rank")
    parser.add_argument("--step-rate", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="optimizer steps/s")
    parser.add_argument("--convert-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="toy size, one round, writes nothing (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.rounds, args.batch_size, args.convert_workers, args.out = 32, 1, 8, 1, None

    import torch

    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.data.tokenizer import build_toy_tokenizer

    torch.set_num_threads(1)  # per-core numbers: DataLoader workers also run one thread each
    tokenizer, transform = build_toy_tokenizer(), ImageTransform(IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = make_dataset(folder, args.samples)
        mean_kb = sum(p.stat().st_size for p in (folder / "images").iterdir()) / args.samples / 1024
        urls, convert_rate = convert(folder, args.convert_workers)
        paths = {
            "ours (1 worker)": Ours(urls, args.batch_size, 1, tokenizer, transform),
            "plain loop": Plain(folder, records, args.batch_size, tokenizer, transform),
            "ours (in-process)": Ours(urls, args.batch_size, 0, tokenizer, transform),
        }
        rates = measure(paths, args.rounds)
    section = report(args, rates, convert_rate, mean_kb)
    print("\n" + section)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the '{SECTION[3:]}' section of {args.out}")


if __name__ == "__main__":
    main()
