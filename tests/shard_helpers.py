"""Helpers the `vlm-shards` test modules share (test modules never import each other)."""

from __future__ import annotations

import random
from pathlib import Path

import webdataset as wds

from vlm_train.data.shards import main
from vlm_train.data.synthetic import make_sample

TEXT_ONLY = [{"from": "human", "value": "what color is the circle ?"}, {"from": "gpt", "value": "red"}]


def image_records(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list[dict]:
    """LLaVA records over synthetic scenes, their PNGs written to `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        png, record = make_sample(rng)
        (folder / f"{prefix}{i}.png").write_bytes(png)
        records.append({"id": f"{prefix}-{i}", "image": f"{prefix}{i}.png", "conversations": record["conversations"]})
    return records


def read_shards(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def convert(source: Path, images: Path, out: Path, *extra: str, workers: int = 2) -> int:
    """`vlm-shards llava` (or `captions` for a .csv source) in-process."""
    command = ["captions", "--csv"] if source.suffix == ".csv" else ["llava", "--json"]
    return main([*command, str(source), "--images", str(images), "--out", str(out), *extra, "--workers", str(workers)])
