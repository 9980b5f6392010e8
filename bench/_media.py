"""AnyRes images and video through the data pipeline against a plain loop doing the same work
(bench/data.py runs both after its fixed-size cases and reports them).

- AnyRes: JPEG scenes of several aspect ratios read as LLaVA-NeXT reads them (CLIP ViT-L/14-336 tiles
  at its five 336 px pinpoints plus the base view); the plain loop is transformers'
  `LlavaNextImageProcessorPil` (rescale and normalise off: the same uint8 tiles, checked), the same
  chat template and tokenizer, a hand-written collate.
- Video: mp4 clips (640x360, 48 frames) read as LLaVA-OneVision reads them (16 frames evenly
  sampled, resized to SigLIP-384's 384 px); the plain loop decodes with PyAV, picks the same frames
  with `np.linspace`, resizes with PIL (the same frames, checked).
"""

from __future__ import annotations

import io
import json
import random
import statistics
import sys
from pathlib import Path

from _timing import Clock, Ours, measure, ratio

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's grid pinpoints
TILE, TILE_GRID = 336, 24  # CLIP ViT-L/14-336: 24 x 24 patches a tile
ANYRES_SOURCES = [(640, 480), (480, 640), (1024, 512), (512, 1024), (800, 800)]  # (width, height)
FRAME, FRAME_GRID = 384, 27  # SigLIP so400m-384 (LLaVA-OneVision): 27 x 27 patches a frame
CLIP_SIZE, CLIP_FRAMES, CLIP_FPS, MAX_FRAMES = (640, 360), 48, 24, 16


def _layout(tile: int, grid: int):
    from vlm_train.models.anyres import AnyResLayout

    return AnyResLayout([[h * tile // TILE, w * tile // TILE] for h, w in PINPOINTS], tile, grid, 8, None)


def _noisy(image, noise):
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, np.float32) + noise.normal(0, 12, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_anyres_shard(folder: Path, count: int) -> tuple[str, list[tuple[bytes, list]]]:
    """`count` JPEG scenes at the ANYRES_SOURCES sizes with a question each, as one shard; their
    (JPEG, conversation) pairs for the plain loop."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from vlm_train.data.synthetic import make_sample

    rng, noise, records = random.Random(0), np.random.default_rng(0), []
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "anyres.tar")) as sink:
        for i in range(count):
            png, record = make_sample(rng)
            scene = Image.open(io.BytesIO(png)).convert("RGB").resize(ANYRES_SOURCES[i % 5], Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            _noisy(scene, noise).save(buffer, format="JPEG", quality=90)
            records.append((buffer.getvalue(), record["conversations"]))
            sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "json": json.dumps(record).encode()})
    return str(folder / "anyres.tar"), records


def write_video_shard(folder: Path, count: int) -> tuple[str, list[tuple[bytes, list]]]:
    """`count` mp4 clips (a scene drifting across a noisy 640x360 frame) with a question each."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from vlm_train.data.synthetic import make_sample
    from vlm_train.data.synthetic_video import encode_video

    rng, noise, records = random.Random(0), np.random.default_rng(0), []
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "video.tar")) as sink:
        for i in range(count):
            png, record = make_sample(rng)
            scene = Image.open(io.BytesIO(png)).convert("RGB").resize((160, 160))
            frames = []
            for t in range(CLIP_FRAMES):
                canvas = Image.new("RGB", CLIP_SIZE, (200, 200, 200))
                canvas.paste(scene, (t * 8 % 480, 100))
                frames.append(_noisy(canvas, noise))
            clip = encode_video(frames, CLIP_FPS)
            turns = [{"from": "human", "value": "<video>\nwhat happens ?"}, record["conversations"][1]]
            records.append((clip, turns))
            sink.write({"__key__": f"{i:06d}", "mp4": clip, "json": json.dumps({"conversations": turns}).encode()})
    return str(folder / "video.tar"), records


class PlainLoop:
    """A hand-written loop over `records` (media bytes, conversation): `media(bytes)` -> (pixels,
    visual tokens, extra batch entries), the same chat template and tokenizer, a collate by hand."""

    def __init__(self, records, batch_size: int, tokenizer, media, video: bool):
        self.records, self.batch_size, self.tokenizer, self.media, self.video = (
            records,
            batch_size,
            tokenizer,
            media,
            video,
        )

    def batch(self, records) -> dict:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        from vlm_train.data.templates import encode

        ids, labels, pixels, extra = [], [], [], []
        for blob, turns in records:
            media, tokens, sample_extra = self.media(blob)
            counts = {"image_tokens": [], "video_tokens": [tokens]} if self.video else {"image_tokens": [tokens]}
            encoded = encode(turns, self.tokenizer, "chat", **counts)
            ids.append(torch.tensor(encoded.input_ids))
            labels.append(torch.tensor(encoded.labels))
            pixels.append(media)
            extra.append(sample_extra)
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        return {
            "pixel_values": torch.cat(pixels),
            "input_ids": input_ids,
            "attention_mask": input_ids.ne(self.tokenizer.pad_token_id).long(),
            "labels": pad_sequence(labels, batch_first=True, padding_value=-100),
            "extra": torch.tensor(extra),
        }

    def round(self) -> tuple[int, float, float, float]:
        clock, samples = Clock(), 0
        usable = len(self.records) - len(self.records) % self.batch_size
        for first in range(0, usable, self.batch_size):
            samples += len(self.batch(self.records[first : first + self.batch_size])["input_ids"])
        return samples, *clock.stop()


def hf_anyres_media(processor, layout):
    """LLaVA-NeXT's image processor on one JPEG: uint8 tiles, the image's visual tokens, its size."""
    import torch
    from PIL import Image

    def media(blob: bytes):
        with Image.open(io.BytesIO(blob)) as image:
            tiles = processor(image, return_tensors="pt")["pixel_values"][0].to(torch.uint8)
            size = (image.height, image.width)
        return tiles, layout.num_tokens(size), size

    return media


def pyav_video_media(layout):
    """One mp4 decoded with PyAV, MAX_FRAMES frames picked as LLaVA-Video picks them, PIL-resized."""

    def media(blob: bytes):
        import av
        import numpy as np
        import torch
        from PIL import Image

        with av.open(io.BytesIO(blob)) as container:
            stream = container.streams.video[0]
            wanted = set(np.linspace(0, stream.frames - 1, MAX_FRAMES, dtype=int).tolist())
            frames = [
                np.asarray(frame.to_image().resize((FRAME, FRAME), Image.Resampling.BICUBIC))
                for index, frame in enumerate(container.decode(stream))
                if index in wanted
            ]
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), layout.video_tokens(len(frames)), len(frames)

    return media


def anyres_case(folder: Path, count: int, batch_size: int, rounds: int) -> tuple[dict, float]:
    """(rates per path, visual tokens per sample) for AnyRes images."""
    import torch
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil

    from vlm_train.data.preprocess import AnyResTransform
    from vlm_train.data.tokenizer import build_toy_tokenizer

    urls, records = write_anyres_shard(folder, count)
    tokenizer, layout = build_toy_tokenizer(), _layout(TILE, TILE_GRID)
    transform = AnyResTransform(TILE, tuple(map(tuple, PINPOINTS)))
    processor = LlavaNextImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
        do_rescale=False,
        do_normalize=False,
    )
    media = hf_anyres_media(processor, layout)
    for blob, _ in records[:5]:  # the same work: the processor's tiles are ours
        if not torch.equal(media(blob)[0], transform(Image.open(io.BytesIO(blob)))):
            sys.exit("bench: LLaVA-NeXT's image processor and AnyResTransform made different tiles")
    options = ("vision.anyres=anyres", "data.max_length=8192")
    ours = Ours(urls, batch_size, 1, tokenizer, transform, layout.num_tokens, *options)
    paths = {"ours (1 worker)": ours, "plain loop": PlainLoop(records, batch_size, tokenizer, media, video=False)}
    return _measured(paths, rounds, ours)


def video_case(folder: Path, count: int, batch_size: int, rounds: int) -> tuple[dict, float]:
    """(rates per path, visual tokens per sample) for mp4 clips."""
    import torch

    from vlm_train.data.preprocess import AnyResTransform
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.data.video import VideoReader, VideoSource

    urls, records = write_video_shard(folder, count)
    tokenizer, layout = build_toy_tokenizer(video=True), _layout(FRAME, FRAME_GRID)
    media = pyav_video_media(layout)
    reader = VideoReader(FRAME, timeout_s=60)
    if not torch.equal(media(records[0][0])[0], reader.read(VideoSource(file=records[0][0]), MAX_FRAMES).frames):
        sys.exit("bench: the plain PyAV loop and vlm_train's VideoReader read different frames")
    transform = AnyResTransform(FRAME, tuple(tuple(p) for p in layout.grid_pinpoints))
    options = ("vision.anyres=anyres", "data.video=true", f"data.max_frames={MAX_FRAMES}", "data.max_length=4096")
    ours = Ours(
        urls, batch_size, 1, tokenizer, transform, layout.num_tokens, *options, video_tokens=layout.video_tokens
    )
    paths = {"ours (1 worker)": ours, "plain loop": PlainLoop(records, batch_size, tokenizer, media, video=True)}
    return _measured(paths, rounds, ours)


def _measured(paths: dict, rounds: int, ours: Ours) -> tuple[dict, float]:
    try:
        rates = measure(paths, rounds)
        if ours.skipped:
            sys.exit(f"bench: our pipeline skipped {ours.skipped} samples: it did less work than the plain loop")
        return rates, ours.visual_tokens / max(ours.samples, 1)
    finally:
        ours.close()


def media_section(anyres: tuple[dict, float], video: tuple[dict, float], counts: tuple[int, int]) -> list[str]:
    """The report's AnyRes and video subsections: samples/s and visual tokens/s per core."""
    lines = []
    titles = (
        f"### AnyRes images ({counts[0]} JPEGs of 5 sizes, 640x480 to 1024x512; LLaVA-NeXT's 336 px tiles)",
        f"### Video ({counts[1]} mp4 clips, 640x360, {CLIP_FRAMES} frames; {MAX_FRAMES} read at {FRAME} px)",
    )
    for title, (rates, tokens) in zip(titles, (anyres, video)):
        lines += [
            title,
            "",
            f"{tokens:.0f} visual tokens per sample on average.",
            "",
            "| path | samples/s per core | visual tokens/s per core | vs plain | samples/s wall | vs plain |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rates.items():
            core, wall = statistics.median(r["core"]), statistics.median(r["wall"])
            lines.append(
                f"| {name} | {core:.1f} | {core * tokens:,.0f} | {ratio(rates, name, 'core'):.2f}x "
                f"| {wall:.1f} | {ratio(rates, name, 'wall'):.2f}x |"
            )
        lines.append("")
    return lines
