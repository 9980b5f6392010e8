"""Data pipeline throughput: our WebDataset path against a plain PIL loop, in the same process.

    python bench/data.py [--samples 1024] [--large-samples 256] [--rounds 6] [--batch-size 16]
                         [--step-rate 1 2 4 8] [--smoke]

Every path turns LLaVA records into batches at 336 px (CLIP ViT-L/14-336: 576 visual tokens):
decode the JPEG, resize the short side + centre-crop to uint8 (the model normalises on the
device), chat template + tokenize (the toy tokenizer), collate.
- ours: shards written by `vlm-shards llava`, read by vlm_train.data.pipeline exactly as training
  reads them, with one DataLoader worker process (and once more in-process, without the worker);
  the worker lives across rounds as it lives across epochs in training;
- plain: the loop one writes by hand over the same records and JPEG files in a folder: PIL
  (convert, resize, crop, to an array: `plain_transform`), the same chat template and tokenizer,
  LLaVA's collate (`plain_collate`), no WebDataset; the same batches as ours (checked).
Two source sizes: 640x480 (`--samples` records) and 1600x1200 (`--large-samples`), where decoding
dominates; at the large size ours also runs with data.jpeg_draft=true (a reduced-size JPEG decode,
not the same pixels: the difference is reported).
Rounds alternate (ours, plain, ...) so that load from other processes hits every path alike; a
round is one epoch; ratios are medians of per-round ratios. Every process runs one thread, and
"per core" counts CPU seconds of all of a path's processes (the worker included, read from /proc
while it runs). Writes the "Data pipeline" section of docs/benchmarks.md (other sections are left
as they are). `--smoke`: a few records, one round, nothing written (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _media import anyres_case, media_section, video_case
from _report import run_details, write_section  # bench/_report.py: this folder is on sys.path
from _timing import Clock, Ours, measure, ratio, table

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, PATCH = 336, 14
TOKENS = (IMAGE_SIZE // PATCH) ** 2  # visual tokens per image (576)
SMALL, LARGE = (640, 480), (1600, 1200)


def make_dataset(folder: Path, count: int, size: tuple[int, int]) -> list[dict]:
    """`count` LLaVA records over JPEGs of `size` (synthetic scenes, upscaled, with sensor-like
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
        scene = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize(size, Image.BICUBIC), np.float32)
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


def plain_transform(image, size: int = IMAGE_SIZE):
    """CLIP's resize + centre crop as one writes it by hand with PIL (convert, resize, crop, to an
    array, to a tensor): the same pixels as vlm_train's ImageTransform (checked in `main`), with
    the copies straightforward code makes."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    resized = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def plain_collate(samples: list, pad_id: int) -> dict:
    """LLaVA's DataCollatorForSupervisedDataset as one writes it: a tensor per sample, padded with
    pad_sequence (the same batch as vlm_train's collate, checked in `check_same_batch`)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    input_ids = [torch.tensor(enc.input_ids) for _, _, enc in samples]
    labels = [torch.tensor(enc.labels) for _, _, enc in samples]
    input_ids = pad_sequence(input_ids, batch_first=True, padding_value=pad_id)
    return {
        "pixel_values": torch.cat([pixels for _, pixels, _ in samples]),
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(pad_id).long(),
        "labels": pad_sequence(labels, batch_first=True, padding_value=-100),
        "keys": [key for key, _, _ in samples],
    }


class Plain:
    """The loop one writes without a data library: PIL by hand (`plain_transform`), the same chat
    template and tokenizer, LLaVA's collate (`plain_collate`)."""

    def __init__(self, folder: Path, records: list[dict], batch_size: int, tokenizer):
        self.folder, self.records, self.batch_size, self.tokenizer = folder, records, batch_size, tokenizer

    def batch(self, records: list[dict], collate) -> dict:
        from PIL import Image

        from vlm_train.data.templates import encode, truncate

        image_id, samples = self.tokenizer.convert_tokens_to_ids("<image>"), []
        for record in records:
            with Image.open(self.folder / "images" / record["image"]) as image:
                pixels = plain_transform(image).unsqueeze(0)
            encoded = encode(record["conversations"], self.tokenizer, "chat", TOKENS)
            samples.append((record["id"], pixels, truncate(encoded, 1024, image_id)))
        return collate(samples, self.tokenizer.pad_token_id)

    def round(self) -> tuple[int, float, float, float]:
        clock, samples = Clock(), 0
        usable = len(self.records) - len(self.records) % self.batch_size
        for first in range(0, usable, self.batch_size):
            samples += len(self.batch(self.records[first : first + self.batch_size], plain_collate)["keys"])
        return samples, *clock.stop()

    def check_same_batch(self, transform) -> None:
        """The plain loop makes what vlm_train makes of the same records (the same work is compared)."""
        import torch
        from PIL import Image

        from vlm_train.data.pipeline import collate

        records = self.records[: self.batch_size]
        for record in records:
            with Image.open(self.folder / "images" / record["image"]) as image:
                if not torch.equal(transform(image), plain_transform(image)):
                    sys.exit(f"bench: the plain loop's pixels differ from vlm_train's for {record['image']}")
        plain, ours = self.batch(records, plain_collate), self.batch(records, collate)
        for name in ("pixel_values", "input_ids", "attention_mask", "labels"):
            if not torch.equal(plain[name], ours[name]):
                sys.exit(f"bench: the plain loop's {name} differ from vlm_train's collate")


def workers_needed(rate: float, step_rate: float, batch_size: int) -> int:
    return math.ceil(step_rate * batch_size / rate)


def verdict(rates: dict) -> str:
    core, wall = ratio(rates, "ours (1 worker)", "core"), ratio(rates, "ours (1 worker)", "wall")
    each = [a / b for a, b in zip(rates["ours (1 worker)"]["core"], rates["plain loop"]["core"])]
    met = "met" if core >= 1.0 and wall >= 1.0 else "not met"
    return (
        f"**Ours (1 worker) / plain loop: {core:.2f}x per core, {wall:.2f}x in wall time** (per core, each "
        f"round: {min(each):.2f}x to {max(each):.2f}x); goal >= 1.0x per core and ahead in wall time "
        f"(issue 21): {met}."
    )


def report(args, small: dict, large: dict, facts: dict) -> str:
    ours = statistics.median(small["ours (1 worker)"]["core"])
    lines = [
        "## Data pipeline",
        "",
        f"{run_details()}. LLaVA records -> {IMAGE_SIZE} px, chat template, toy tokenizer, batches of "
        f"{args.batch_size}, one epoch per round, {args.rounds} rounds, paths interleaved (ours, plain, ...). "
        "Per core = samples per CPU second of every process of the path (the loader worker included), one "
        "thread each; ratios are medians of per-round ratios. The plain loop is the one written by hand "
        "(PIL convert, resize, crop, `np.array`; the same chat template and tokenizer; LLaVA's collate: a "
        "tensor per sample and `pad_sequence`; files in a folder); it makes the same batches as ours "
        "(checked before timing). The worker lives across rounds as it lives across "
        "epochs in training; what it prefetched while the other paths ran is counted in its round's CPU "
        "and wall time.",
        "",
        f"### {SMALL[0]}x{SMALL[1]} sources ({args.samples} records, mean {facts['small_kb']:.0f} kB)",
        "",
        *table(small),
        "",
        verdict(small),
        "",
        f"### {LARGE[0]}x{LARGE[1]} sources ({args.large_samples} records, mean {facts['large_kb']:.0f} kB)",
        "",
        *table(large),
        "",
        verdict(large)
        + f" With `data.jpeg_draft=true` these decode at 1/2 size (800x600, DCT-domain scaling) before the resize: "
        f"{ratio(large, 'ours (1 worker, jpeg_draft)', 'core'):.2f}x the plain loop per core. Not the same "
        f"pixels as a full decode: mean absolute difference {facts['draft_mean']:.2f} of 255 levels, "
        f"{facts['draft_share']:.1%} of values off by more than 8, largest {facts['draft_max']:.0f} (these "
        "records); 640x480 sources have no smaller scale that covers the 448x336 resize and decode exactly "
        "as without it.",
        "",
        "Both sides spend most of a sample in the same PIL calls (JPEG decode and the bicubic resize, about "
        "80% at 640x480), so the margin is small and comes from what surrounds them: the worker starts once "
        "(not once per epoch) and has the next epoch's batches ready at the epoch's end; the transform copies "
        "the pixels once (PIL's bytes, viewed as the crop; no convert() of an RGB image to itself, no "
        "separate crop or array copy) and collate writes them straight into a shared-memory slot the worker "
        "reuses (vlm_train/data/transfer.py); token ids become tensors through numpy (5x faster than "
        "`torch.tensor` on a list) and cross from the worker inline in the pickle rather than one "
        "shared-memory segment per tensor; samples come sequentially from tar shards rather than one file "
        "open each.",
        "",
        f"DataLoader workers (one core each) that feed a step rate at {ours:.1f} samples/s per worker "
        f"({SMALL[0]}x{SMALL[1]} sources):",
        "",
        "| steps/s | samples per step per rank | workers per rank |",
        "|---|---|---|",
    ]
    for step_rate in args.step_rate:
        lines.append(f"| {step_rate:g} | {args.batch_size} | {workers_needed(ours, step_rate, args.batch_size)} |")
    lines += [
        "",
        f"`vlm-shards llava` converted the {args.samples} {SMALL[0]}x{SMALL[1]} records at "
        f"{facts['convert_rate']:.0f} samples/s (wall) with {args.convert_workers} worker processes; it checks "
        "every record and decodes every image once.",
        "",
    ]
    return "\n".join(lines)


def draft_difference(folder: Path, records: list[dict], transform) -> tuple[float, float, float]:
    """(mean, share > 8, max) absolute difference between the draft decode and the full one."""
    import dataclasses

    import torch
    from PIL import Image

    drafted = dataclasses.replace(transform, jpeg_draft=True)
    differences = []
    for record in records:
        with Image.open(folder / "images" / record["image"]) as image:
            full = transform(image).int()
        with Image.open(folder / "images" / record["image"]) as image:
            differences.append((drafted(image).int() - full).abs().flatten())
    every = torch.cat(differences).float()
    return float(every.mean()), float((every > 8).float().mean()), float(every.max())


def run_case(args, folder: Path, count: int, size: tuple[int, int], tokenizer, transform, draft: bool) -> tuple:
    """Records of `size`, their shards, the paths, the rounds: (rates, records, mean kB, conversion rate)."""
    records = make_dataset(folder, count, size)
    mean_kb = sum(p.stat().st_size for p in (folder / "images").iterdir()) / count / 1024
    urls, convert_rate = convert(folder, args.convert_workers)
    plain = Plain(folder, records, args.batch_size, tokenizer)
    plain.check_same_batch(transform)
    paths = {
        "ours (1 worker)": Ours(urls, args.batch_size, 1, tokenizer, transform, TOKENS),
        "plain loop": plain,
        "ours (in-process)": Ours(urls, args.batch_size, 0, tokenizer, transform, TOKENS),
    }
    if draft:
        draft_path = Ours(urls, args.batch_size, 1, tokenizer, transform, TOKENS, "data.jpeg_draft=true")
        paths["ours (1 worker, jpeg_draft)"] = draft_path
    print(f"{size[0]}x{size[1]} sources:")
    try:
        return measure(paths, args.rounds), records, mean_kb, convert_rate
    finally:
        for path in paths.values():
            if isinstance(path, Ours):
                path.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="640x480 records; one epoch of them per round")
    parser.add_argument("--large-samples", type=int, default=256, help="1600x1200 records")
    parser.add_argument("--anyres-samples", type=int, default=128, help="AnyRes records (bench/_media.py)")
    parser.add_argument("--video-samples", type=int, default=32, help="mp4 clips (bench/_media.py)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step per rank")
    parser.add_argument("--step-rate", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="optimizer steps/s")
    parser.add_argument("--convert-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="toy size, one round, writes nothing (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.large_samples, args.rounds, args.batch_size, args.convert_workers = 32, 16, 1, 8, 1
        args.anyres_samples, args.video_samples = 8, 4
        args.out = None

    import torch

    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.data.tokenizer import build_toy_tokenizer

    torch.set_num_threads(1)  # per-core numbers: DataLoader workers also run one thread each
    tokenizer, transform = build_toy_tokenizer(), ImageTransform(IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
    with tempfile.TemporaryDirectory() as tmp:
        small, _, small_kb, convert_rate = run_case(
            args, Path(tmp) / "small", args.samples, SMALL, tokenizer, transform, draft=False
        )
        large, large_records, large_kb, _ = run_case(
            args, Path(tmp) / "large", args.large_samples, LARGE, tokenizer, transform, draft=True
        )
        draft_mean, draft_share, draft_max = draft_difference(Path(tmp) / "large", large_records[:32], transform)
        print("AnyRes images:")
        anyres = anyres_case(Path(tmp) / "anyres", args.anyres_samples, args.batch_size, args.rounds)
        print("video:")
        video = video_case(Path(tmp) / "video", args.video_samples, min(args.batch_size, 4), args.rounds)
    facts = dict(small_kb=small_kb, large_kb=large_kb, convert_rate=convert_rate)
    facts.update(draft_mean=draft_mean, draft_share=draft_share, draft_max=draft_max)
    section = report(args, small, large, facts)
    section += "\n" + "\n".join(media_section(anyres, video, (args.anyres_samples, args.video_samples)))
    print("\n" + section)
    if args.out is not None:
        write_section(section, args.out)


if __name__ == "__main__":
    main()
